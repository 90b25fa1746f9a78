"""One job over two real processes (gloo CPU collectives, 4 fake devices each), preempted and resumed, against
the same job on one process with 8 fake devices: the same global batches, so the same params."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.journey  # each process trains (flaxclf.training.loop.run)
TIMEOUT_S = 300

# Runs flaxclf.training.loop.run in one process. XLA_FLAGS is set before jax is imported. Hooks record what this process
# tokenized and which global rows made each of its batches.
_DRIVER = r'''
import json, os, signal, sys
spec = json.loads(sys.argv[1])
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={spec['devices']} --xla_backend_optimization_level=0"
os.environ["JAX_PLATFORMS"] = "cpu"
from flaxclf import data
from flaxclf.training import checkpoint
from flaxclf.training import loop as train
from flaxclf.config import load_config
from flaxclf.data import tokens

out = {"tokenized": {}, "splits": {}, "plan": {}, "start_step": None}
tokenized, load_task, plan, save, setup = (tokens.tokenize_cached, data.load_task, data.TrainBatches.epoch_plan,
                                           checkpoint.Checkpointer.save, train.setup)

def counting_tokenized(tok, tok_hash, texts, *args):
    out["tokenized"][args[-1]] = len(texts)
    return tokenized(tok, tok_hash, texts, *args)

def recording_load_task(*args, **kwargs):
    task, splits = load_task(*args, **kwargs)
    out["splits"] = {s: {"local": len(v), "total": v.num_rows_total, "rows": v.rows.tolist()}
                     for s, v in splits.items()}
    return task, splits

def recording_plan(self, epoch):
    steps = plan(self, epoch)
    out["plan"][str(epoch)] = [(int(k), self.split.rows[idx].tolist()) for k, idx in steps]
    return steps

def preempting_save(self, step, *args, **kwargs):
    save(self, step, *args, **kwargs)
    if step == spec.get("preempt_after"):
        os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the loop checkpoints and exits 143

def recording_setup(cfg, *args):
    job = setup(cfg, *args)
    out["start_step"] = int(job.state.step)
    return job

tokens.tokenize_cached, data.load_task = counting_tokenized, recording_load_task
data.TrainBatches.epoch_plan = recording_plan
checkpoint.Checkpointer.save, train.setup = preempting_save, recording_setup
try:
    train.run(load_config(spec["config"], spec["overrides"]), show_progress=False)
finally:
    with open(spec["report"], "w") as f:
        json.dump(out, f)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_data(folder: Path) -> tuple[Path, Path]:
    words = "good bad film plot actor scene boring great slow funny dull moving".split()
    rng = np.random.default_rng(0)

    def rows(n: int) -> str:
        lines = []
        for _ in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(2, 28))))
            lines.append(f"{text},{'pos' if 'good' in text or 'great' in text else 'neg'}\n")
        return "text,label\n" + "".join(lines)

    train, val = folder / "train.csv", folder / "val.csv"
    train.write_text(rows(203))
    val.write_text(rows(41))
    return train, val


def _launch(driver: Path, specs: list[dict], tmp: Path) -> list[tuple[int, str]]:
    """Starts one driver per spec, waits for all (TIMEOUT_S), kills stragglers; (exit code, stderr tail) each."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = []
    try:
        for spec in specs:
            log = open(tmp / f"{Path(spec['report']).stem}.log", "w")
            procs.append((subprocess.Popen([sys.executable, str(driver), json.dumps(spec)], cwd=REPO, env=env,
                                           stdout=log, stderr=subprocess.STDOUT), log))
        for p, _ in procs:
            p.wait(timeout=TIMEOUT_S)
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    return [(p.returncode, Path(log.name).read_text()[-3000:]) for p, log in procs]


def _read(path: Path) -> dict:
    return json.loads(path.read_text())


def test_two_processes_preempted_and_resumed_equal_one_process(tmp_path, tiny_model_dir):
    from safetensors.numpy import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    train_csv, val_csv = _write_data(tmp_path)
    common = [f"model.name={tiny_model_dir}", "data.task=null", f"data.train_file={train_csv}",
              f"data.validation_file={val_csv}", "data.max_length=32", "data.buckets=[32]",
              "optim.learning_rate=1.0e-3", "train.global_batch_size=16", "train.max_steps=6",
              "train.eval_every=6", "train.log_every=2", "train.export=final", "checkpoint.every_steps=3",
              "checkpoint.keep=5", "mesh.data=-1", "mesh.fsdp=2"]
    config = str(REPO / "configs" / "tiny.yaml")

    def multi(phase: int, port: int) -> list[dict]:
        run = [f"train.output_dir={tmp_path / 'multi'}", f"data.cache_dir={tmp_path / 'cache-multi'}",
               "distributed.mode='on'", f"distributed.coordinator_address=127.0.0.1:{port}",
               "distributed.num_processes=2", "distributed.cpu_collectives=gloo"]
        return [{"devices": 4, "config": config, "preempt_after": 3 if phase == 1 else None,
                 "overrides": common + run + [f"distributed.process_id={i}"],
                 "report": str(tmp_path / f"phase{phase}-p{i}.json")} for i in (0, 1)]

    # Phase 1: SIGTERM after checkpoint 3; the processes agree at the next log step (4), checkpoint it, exit 143.
    codes = _launch(driver, multi(1, _free_port()), tmp_path)
    assert [c for c, _ in codes] == [143, 143], "\n".join(t for _, t in codes)
    # Phase 2: a fresh pair of processes resumes from checkpoint 4 and trains to step 6. Beside it, the reference:
    # the same job, uninterrupted, on one process with 8 devices.
    ref = {"devices": 8, "config": config, "report": str(tmp_path / "single.json"),
           "overrides": common + [f"train.output_dir={tmp_path / 'single'}",
                                  f"data.cache_dir={tmp_path / 'cache-single'}", "distributed.mode='off'"]}
    codes = _launch(driver, multi(2, _free_port()) + [ref], tmp_path)
    assert [c for c, _ in codes] == [0, 0, 0], "\n".join(t for _, t in codes)
    phase1 = [_read(tmp_path / f"phase1-p{i}.json") for i in (0, 1)]
    phase2 = [_read(tmp_path / f"phase2-p{i}.json") for i in (0, 1)]
    assert [r["start_step"] for r in phase1 + phase2] == [0, 0, 4, 4]
    assert phase1[0]["plan"] == phase2[0]["plan"] and phase1[1]["plan"] == phase2[1]["plan"]

    # Each process tokenized (phase 1) or loaded from the cache (phase 2) only its share of every split: for train,
    # its 8 slots of the global batch of 16 (row i sits in slot i % 16); for validation, rows i % 2.
    owners = {"train": lambda i: (i % 16) // 8, "validation": lambda i: i % 2}
    for reports in (phase1, phase2):
        for split, total in (("train", 203), ("validation", 41)):
            local = [r["splits"][split]["local"] for r in reports]
            assert [r["tokenized"][split] for r in reports] == local
            assert all(r["splits"][split]["total"] == total for r in reports)
            assert [r["splits"][split]["rows"] for r in reports] == [
                [i for i in range(total) if owners[split](i) == p] for p in (0, 1)]

    # Process 0 alone wrote the run files; the checkpoints hold the interval save, the preemption save and the end.
    multi_dir = tmp_path / "multi"
    assert sorted(int(p.name) for p in (multi_dir / "checkpoints").iterdir() if p.name.isdigit()) == [3, 4, 6]
    steps = [r["step"] for r in map(json.loads, (multi_dir / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert steps == [2, 3, 4, 6], steps  # logged once each, though steps 1-4 ran in another attempt

    single = _read(tmp_path / "single.json")
    assert single["tokenized"] == {"train": 203, "validation": 41}
    # Without any help the single process draws the same global batches: process 0's slots, then process 1's.
    assert single["plan"].keys() == phase1[0]["plan"].keys() == {"0"}
    shares = list(zip(phase1[0]["plan"]["0"], phase1[1]["plan"]["0"], strict=True))
    assert all(k0 == k1 for (k0, _), (k1, _) in shares)
    assert single["plan"]["0"] == [[k, rows0 + rows1] for (k, rows0), (_, rows1) in shares]

    got = load_file(str(multi_dir / "export" / "model.safetensors"))
    want = load_file(str(tmp_path / "single" / "export" / "model.safetensors"))
    assert got.keys() == want.keys()
    diff = max(float(np.max(np.abs(got[k].astype(np.float64) - want[k]))) for k in got)
    init = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max(float(np.max(np.abs(want[k].astype(np.float64) - init[k]))) for k in want if k in init)
    print(f"max |params(2 processes x 4, resumed) - params(1 process x 8)| = {diff:.3g}; training moved "
          f"params by up to {moved:.3g}")
    assert moved > 1e-4  # the comparison is not between two untrained models
    assert diff <= 1e-5


def test_two_processes_evaluate_chunked_texts_as_one_process_does(tmp_path, tiny_model_dir):
    """data.long_text=chunks on two processes: every text's windows are trained on and brought together into one
    prediction per text wherever they were evaluated, so metrics count texts and equal one process's."""
    from safetensors.numpy import load_file

    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    rng = np.random.default_rng(1)
    words = "good bad film plot actor scene boring great slow funny dull moving".split()
    for name, n in (("train", 64), ("val", 23)):
        lines = []
        for _ in range(n):
            text = " ".join(rng.choice(words, size=int(rng.integers(4, 90))))
            lines.append(f"{text},{'pos' if text.count('good') > text.count('bad') else 'neg'}\n")
        (tmp_path / f"{name}.csv").write_text("text,label\n" + "".join(lines))
    common = [f"model.name={tiny_model_dir}", "data.task=null", f"data.train_file={tmp_path / 'train.csv'}",
              f"data.validation_file={tmp_path / 'val.csv'}", "data.max_length=16", "data.buckets=[8, 16]",
              "data.long_text=chunks", "data.stride=4", "optim.learning_rate=1.0e-3", "train.global_batch_size=16",
              "train.max_steps=4", "train.eval_every=2", "train.export=final", "checkpoint.every_steps=0",
              "mesh.data=-1", "mesh.fsdp=2"]
    config = str(REPO / "configs" / "tiny.yaml")
    port = _free_port()
    multi = [{"devices": 4, "config": config, "report": str(tmp_path / f"chunks-p{i}.json"),
              "overrides": common + [f"train.output_dir={tmp_path / 'multi'}", f"data.cache_dir={tmp_path / 'cm'}",
                                     "distributed.mode='on'", f"distributed.coordinator_address=127.0.0.1:{port}",
                                     "distributed.num_processes=2", "distributed.cpu_collectives=gloo",
                                     f"distributed.process_id={i}"]} for i in (0, 1)]
    single = {"devices": 8, "config": config, "report": str(tmp_path / "chunks-single.json"),
              "overrides": common + [f"train.output_dir={tmp_path / 'single'}", f"data.cache_dir={tmp_path / 'cs'}",
                                     "distributed.mode='off'"]}
    codes = _launch(driver, multi + [single], tmp_path)
    assert [c for c, _ in codes] == [0, 0, 0], "\n".join(t for _, t in codes)

    reports = [_read(tmp_path / f"chunks-p{i}.json") for i in (0, 1)]
    windows = [len(r["splits"]["validation"]["rows"]) for r in reports]
    assert sum(windows) > 2 * 23  # the texts really were cut into windows, shared by text between the processes
    assert set(reports[0]["splits"]["validation"]["rows"]) == set(range(0, 23, 2))

    def evals(run: str) -> list[dict]:
        records = map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
        return [r for r in records if r["split"].startswith("validation")]

    got, want = evals("multi"), evals("single")
    assert [r["step"] for r in got] == [2, 4, 4] and all(r["count"] == 23 for r in got + want)
    for g, w in zip(got, want, strict=True):
        assert g["confusion_matrix"] == w["confusion_matrix"]
        assert g["macro_f1"] == w["macro_f1"]
    a = load_file(str(tmp_path / "multi" / "export" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "export" / "model.safetensors"))
    assert max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a) <= 1e-5
