"""Checkpoints: a killed run resumes bit-for-bit, SIGTERM saves and exits 143, a checkpoint moves between meshes,
an unreadable checkpoint falls back, the keep policy keeps the best, a foreign run directory is refused, and
params-only loading / export work from any checkpoint."""

import csv
import logging
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from etils import epath
from safetensors.numpy import load_file

from flaxclf import data
from flaxclf.config import CheckpointConfig, MeshConfig, load_config
from flaxclf.hf import weights
from flaxclf.inference import runs as run_files
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.models.registry import ENCODERS
from flaxclf.nn import lora
from flaxclf.runtime import sharding
from flaxclf.training import job as job_setup
from flaxclf.training.checkpoint import Checkpointer, CheckpointError
from flaxclf.training.metrics_log import read_records
from flaxclf.training.optim import make_optimizer
from flaxclf.training.steps import compile_steps, state_shardings
from tests.helpers import CHILD_XLA_FLAGS, child_env

REPO = Path(__file__).resolve().parents[1]
TOTAL = 12  # configs/tiny.yaml: max_steps 12, eval every 6, a checkpoint every 4 steps
WORDS = "good bad great awful fine dull bright moving boring fun".split()

ALL_RULES = [rule for encoder in ENCODERS.values() for rule in encoder.sharding_rules]  # every encoder's


def _write_csvs(folder: Path, labels: tuple[str, str]) -> Path:
    """96 training rows (6 steps of 16) and 32 validation rows of a two-way toy task."""
    rng = random.Random(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", 96), ("validation", 32)):
        with (folder / f"{split}.csv").open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["text", "label"])
            for _ in range(n):
                text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
                w.writerow([text, labels[0] if ("good" in text or "great" in text) else labels[1]])
    return folder


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory) -> Path:
    return _write_csvs(tmp_path_factory.mktemp("toy"), ("pos", "neg"))


def _overrides(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.name={model_dir}", f"train.output_dir={out}", "data.task=null",
            f"data.train_file={data_dir / 'train.csv'}", f"data.validation_file={data_dir / 'validation.csv'}",
            "data.max_length=32", "data.buckets=[32]", "train.log_every=1", *extra]


def _launch(overrides: list[str], log_path: Path) -> subprocess.Popen:
    env = child_env(XLA_FLAGS=f"--xla_force_host_platform_device_count=8 {CHILD_XLA_FLAGS}")
    return subprocess.Popen([sys.executable, "train.py", "--config", "configs/tiny.yaml", "--no-progress",
                             *overrides], cwd=REPO, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, ready, what: str, timeout: float = 240) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before {what}"
        assert time.monotonic() - t0 < timeout, f"timed out waiting for {what}"
        time.sleep(0.02)


# The kill -9 journey's runs train LoRA adapters (a large rate, as LoRA takes), so that resuming is shown exact for
# the trained variables' checkpoints and the frozen base read again.
LORA = ("model.lora.rank=4", "model.lora.dropout=0.1", "optim.learning_rate=1e-3")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, csv_dir) -> dict:
    """Three subprocess runs side by side, with LoRA on (its dropout too): `full` never stops; `killed` gets
    SIGKILL right after its first checkpoint and is then resumed by the same command; `term` (an endless run) gets
    SIGTERM."""
    root = tmp_path_factory.mktemp("runs")
    full, killed, term = root / "full", root / "killed", root / "term"
    p_full = _launch(_overrides(tiny_model_dir, csv_dir, full, *LORA), root / "full.log")
    p_kill = _launch(_overrides(tiny_model_dir, csv_dir, killed, *LORA), root / "killed.log")
    p_term = _launch(_overrides(tiny_model_dir, csv_dir, term, *LORA, "train.max_steps=100000",
                                "train.eval_every=100000", "checkpoint.every_steps=0"), root / "term.log")
    _wait_for(p_kill, lambda: (killed / "checkpoints" / "4").is_dir(), "checkpoint 4")
    p_kill.send_signal(signal.SIGKILL)
    _wait_for(p_term, lambda: len(read_records(term)) >= 3, "3 logged steps")
    p_term.send_signal(signal.SIGTERM)
    rcs = {"killed": p_kill.wait(), "term": p_term.wait(timeout=240)}
    p_resume = _launch(_overrides(tiny_model_dir, csv_dir, killed, *LORA), root / "resumed.log")
    rcs["resumed"], rcs["full"] = p_resume.wait(timeout=300), p_full.wait(timeout=300)
    logs = {k: (root / f"{k}.log").read_text() for k in ("full", "killed", "term", "resumed")}
    return {"full": full, "killed": killed, "term": term, "rc": rcs, "log": logs}


def _tree_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and np.array_equal(x, y), f"{sharding.path_str(path)} differs"


def _comparable(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in records]


def test_killed_run_resumes_bit_for_bit(runs):
    assert runs["rc"]["full"] == 0, runs["log"]["full"]
    assert runs["rc"]["killed"] == -signal.SIGKILL, "the run ended before it could be killed"
    assert runs["rc"]["resumed"] == 0, runs["log"]["resumed"]
    resumed_at = [line for line in runs["log"]["resumed"].splitlines() if line.startswith("resumed from")]
    assert resumed_at, runs["log"]["resumed"]
    start = int(resumed_at[0].split(" at step ")[1].split()[0])
    assert 4 <= start < TOTAL
    # Same final params (and optimizer state) to the bit: same batches, dropout keys and schedule.
    _, p_full, meta_full = run_files.load_params_for_inference(runs["full"], step=TOTAL)
    _, p_res, meta_res = run_files.load_params_for_inference(runs["killed"], step=TOTAL)
    _tree_equal(p_full, p_res)
    assert meta_full["data"] == meta_res["data"] and meta_full["best"] == meta_res["best"]
    st_full = load_file(str(runs["full"] / "export" / "model.safetensors"))
    st_res = load_file(str(runs["killed"] / "export" / "model.safetensors"))
    assert st_full.keys() == st_res.keys() and all(np.array_equal(st_full[k], st_res[k]) for k in st_full)
    # metrics.jsonl: every step once, with the same values, as if the run had never stopped.
    full, res = read_records(runs["full"]), read_records(runs["killed"])
    assert [(r["step"], r["split"]) for r in res] == [(r["step"], r["split"]) for r in full]
    assert [r["step"] for r in full if r["split"] == "train"] == list(range(1, TOTAL + 1))
    assert _comparable(res) == _comparable(full)
    # The checkpoints hold the trained variables (LoRA's matrices, the classifier) and their moments alone; the
    # base is read again from model.name, checked against its hash.
    ckpt, _ = run_files.open_run(runs["killed"])
    saved = ocp.PyTreeCheckpointHandler().metadata(epath.Path(ckpt.directory / str(TOTAL) / "state")).tree
    names = {sharding.path_str(p) for p, _ in jax.tree_util.tree_leaves_with_path(
        saved, is_leaf=lambda x: hasattr(x, "shape"))}
    assert any(n.endswith("query/lora_A") for n in names) and any(n.endswith("classifier/kernel") for n in names)
    assert not any("embeddings" in n or n.endswith("query/kernel") for n in names), sorted(names)
    assert meta_res["base_sha256"] == weights.checkpoint_sha256(meta_res["model_dir"])


def test_sigterm_saves_the_step_it_stopped_at_and_exits_143(runs):
    assert runs["rc"]["term"] == 143, runs["log"]["term"]
    last = read_records(runs["term"])[-1]["step"]
    assert f"stopped by signal {int(signal.SIGTERM)} after step {last}" in runs["log"]["term"]
    ckpt, _ = run_files.open_run(runs["term"])
    assert ckpt.steps() == [last]  # checkpoint.every_steps=0: the only checkpoint is the one the signal made
    assert ckpt.read_meta(last)["data"]["step"] == last % 6  # 6 batches an epoch
    _, params, meta = run_files.load_params_for_inference(runs["term"])
    assert meta["step"] == last and all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(params)))


def test_keep_policy_and_best_checkpoint_after_a_run(runs):
    # keep=2 with saves at 4, 6 (eval), 8, 12 (eval): the last two, plus the best of 6 and 12.
    ckpt, cfg = run_files.open_run(runs["full"])
    best = ckpt.best_step()
    assert best in (6, 12) and ckpt.steps() == sorted({best, 8, 12})
    _, _, meta = run_files.load_params_for_inference(runs["full"], step="best")
    assert meta["step"] == best and cfg.train.max_steps == TOTAL


def _mesh(shape: tuple[int, int, int]) -> jax.sharding.Mesh:
    if shape == (1, 1, 1):
        return sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    return sharding.make_mesh(MeshConfig(*shape))


def _check_layout(tree, mesh) -> None:
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        spec = sharding.spec_for(sharding.path_str(path), x.shape, mesh, ALL_RULES)
        assert x.sharding.mesh == mesh and x.sharding.spec == spec, f"{sharding.path_str(path)}: {x.sharding}"


def _adam_states(opt_state) -> list:
    return [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
            if isinstance(s, optax.ScaleByAdamState)]


def test_checkpoint_moves_between_meshes(tmp_path, tiny_model_dir, csv_dir):
    cfg = load_config(REPO / "configs/tiny.yaml",
                      _overrides(tiny_model_dir, csv_dir, tmp_path / "run", "mesh.data=8", "data.prefetch=0"))
    job = job_setup.setup(cfg)
    try:
        for _ in range(2):
            job.state, _ = job.train_step(job.state, next(job.batches))
        job.ckpt.save(2, job.state, job_setup.meta(job))
        job.ckpt.wait()
        saved = jax.device_get(job.state)
        tx = make_optimizer(cfg.optim, job.total_steps, bert_decays)
        for shape in [(2, 2, 2), (1, 1, 1)]:
            mesh = _mesh(shape)
            shardings = state_shardings(job.abstract, mesh, job.model)
            step, state, meta = job.ckpt.restore(job.abstract, shardings)
            assert step == 2
            _tree_equal(state, saved)  # params, optimizer state, step and RNG, bit-exact
            _check_layout(state, mesh)
            assert len(_adam_states(state.opt_state)) == 1  # optax NamedTuples, not lists
            # Training goes on here: one more step from the saved data position.
            batches = data.TrainBatches(job.splits["train"], cfg.train.global_batch_size, cfg.data.buckets,
                                        cfg.train.seed, sharding.batch_sharding(mesh), start_state=meta["data"],
                                        prefetch=0)
            step_fn, _ = compile_steps(job.model, tx, job.model.config.problem_type, 1, mesh, shardings)
            state, m = step_fn(state, next(batches))
            assert int(state.step) == 3 and np.isfinite(float(m["loss"]))
        # ... and back: the 1-device state saved, then restored on (8, 1, 1).
        back = Checkpointer(tmp_path / "back", cfg.checkpoint, "validation/accuracy")
        back.save(3, state, meta)
        back.wait()
        host = jax.device_get(state)
        _, state8, _ = back.restore(job.abstract, job.shardings)
        _tree_equal(state8, host)
        _check_layout(state8, job.mesh)
        state8, m = job.train_step(state8, next(job.batches))
        assert int(state8.step) == 4 and np.isfinite(float(m["loss"]))
        back.close()
    finally:
        job.batches.close()
        job.ckpt.close()


def _toy_state(value: float) -> dict:
    return {"w": jnp.full((4, 2), value, jnp.float32), "n": jnp.array(int(value), jnp.int32)}


def _toy_abstract():
    abstract = jax.eval_shape(lambda: _toy_state(0.0))
    return abstract, jax.tree.map(lambda _: sharding.replicated(_mesh((8, 1, 1))), abstract)


def test_unreadable_latest_checkpoint_falls_back_with_a_warning(tmp_path, caplog):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, CheckpointConfig(keep=3), "validation/accuracy")
    for step in (1, 2):
        ckpt.save(step, _toy_state(step), {"step": step})
    ckpt.close()
    state_files = [f for f in (directory / "2" / "state").rglob("*") if f.is_file()]
    assert state_files
    for f in state_files:
        f.write_bytes(b"\0" * max(1, f.stat().st_size // 2))  # truncated and overwritten
    ckpt = Checkpointer(directory, CheckpointConfig(keep=3), "validation/accuracy")
    with caplog.at_level(logging.WARNING, logger="flaxclf"):
        step, state, meta = ckpt.restore(*_toy_abstract())
    assert step == 1 and meta == {"step": 1} and float(state["w"][0, 0]) == 1.0
    assert any(f"checkpoint {directory / '2'} is unreadable" in r.getMessage() for r in caplog.records)
    # Moved aside, not deleted, so that the resumed run can write its own step 2.
    assert ckpt.steps() == [1] and (tmp_path / "checkpoints.unreadable" / "2" / "state").is_dir()
    ckpt.save(2, _toy_state(5.0), {"step": 2})
    ckpt.wait()
    assert ckpt.restore(*_toy_abstract())[0] == 2
    ckpt.close()


def test_a_checkpoint_of_another_shape_is_refused_not_moved(tmp_path):
    directory = tmp_path / "checkpoints"
    ckpt = Checkpointer(directory, CheckpointConfig(keep=3), "validation/accuracy")
    ckpt.save(1, _toy_state(1.0), {"step": 1})
    ckpt.close()
    abstract, shardings = _toy_abstract()
    abstract = {**abstract, "w": jax.ShapeDtypeStruct((4, 3), jnp.float32)}
    ckpt = Checkpointer(directory, CheckpointConfig(keep=3), "validation/accuracy")
    with pytest.raises(CheckpointError, match=r"another model shape \(w: \(4, 2\) -> \(4, 3\)\).*fresh=true"):
        ckpt.restore(abstract, shardings)
    assert ckpt.steps() == [1] and not (tmp_path / "checkpoints.unreadable").exists()
    ckpt.close()


def test_params_restore_in_the_process_that_saved(tmp_path):
    """The best params are read back through the manager that saved them (the end of every run does this)."""
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=3), "validation/accuracy")
    for step in (1, 2):
        ckpt.save(step, {"params": _toy_state(step), "opt": _toy_state(-step)}, {"step": step})
    ckpt.wait()
    abstract, shardings = _toy_abstract()
    params = ckpt.restore_params(1, abstract, shardings)
    assert float(params["w"][0, 0]) == 1.0 and int(params["n"]) == 1
    assert params["w"].sharding == shardings["w"]
    ckpt.close()


@pytest.mark.parametrize("metric, values, best", [
    ("validation/accuracy", {2: 0.9, 4: 0.5, 6: 0.7}, 2),
    ("validation/loss", {2: 0.8, 3: 0.1, 6: 0.4}, 3),
])
def test_keep_last_k_and_the_best(tmp_path, metric, values, best):
    ckpt = Checkpointer(tmp_path / "checkpoints", CheckpointConfig(keep=2), metric)
    for step in range(1, 7):
        metrics = {metric: values[step]} if step in values else None
        ckpt.save(step, _toy_state(step), {"step": step}, metrics)
    ckpt.wait()
    assert ckpt.steps() == [best, 5, 6] and ckpt.best_step() == best
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(map(str, [best, 5, 6]))
    ckpt.close()


def test_foreign_run_directory_is_refused_unless_fresh(runs, tmp_path, tiny_model_dir, csv_dir):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["full"] / "checkpoints", run_dir / "checkpoints")
    other_labels = _write_csvs(tmp_path / "other", ("yes", "no"))
    with pytest.raises(CheckpointError, match=r"data.train_file: .* -> .*labels: \['neg', 'pos'\] -> \['no', 'yes'\]"
                                              r".*fresh=true"):
        job_setup.setup(load_config(REPO / "configs/tiny.yaml", _overrides(tiny_model_dir, other_labels, run_dir,
                                                                           *LORA)))
    other_model = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    with pytest.raises(CheckpointError, match=r"\(model.name: .*tiny-bert.* -> .*other-model\);.*fresh=true"):
        job_setup.setup(load_config(REPO / "configs/tiny.yaml", _overrides(other_model, csv_dir, run_dir, *LORA)))
    job = job_setup.setup(load_config(REPO / "configs/tiny.yaml",
                                  _overrides(tiny_model_dir, other_labels, run_dir, "checkpoint.fresh=true", *LORA)))
    try:
        assert int(job.state.step) == 0 and job.ckpt.steps() == []
    finally:
        job.batches.close()
        job.ckpt.close()


def test_params_only_load_and_export_from_any_checkpoint(runs, tmp_path):
    mesh = _mesh((2, 2, 2))
    ckpt, _ = run_files.open_run(runs["full"])
    for step in ckpt.steps():
        model, params, meta = run_files.load_params_for_inference(runs["full"], step=step, mesh=mesh)
        assert meta["step"] == step and model.config.label_names == ("neg", "pos")
        _check_layout(params, mesh)
        out, exported_step = run_files.export_checkpoint(runs["full"], tmp_path / f"export-{step}", step=step)
        assert exported_step == step
        exported = load_file(str(out / "model.safetensors"))
        from flaxclf.hf.weights import to_pt_state

        expected = to_pt_state(lora.merged(jax.device_get(params), model.config.lora))  # the adapter merged
        assert exported.keys() == expected.keys()
        assert all(np.array_equal(exported[k], expected[k]) for k in expected)
        assert (out / "config.json").is_file() and (out / "vocab.txt").is_file()
    with pytest.raises(CheckpointError, match="has no checkpoint 3"):
        run_files.load_params_for_inference(runs["full"], step=3)
    with pytest.raises(CheckpointError, match="no checkpoints/ folder"):
        run_files.load_params_for_inference(tmp_path / "nothing")


@pytest.mark.hf
def test_a_lora_runs_adapter_gives_peft_the_logits_of_flaxclf_and_of_its_merged_export(runs, tiny_model_dir):
    """The run's adapter/ on its base in peft, its export/ (the adapter merged) in transformers, and flaxclf
    reading adapter/: the same logits."""
    torch = pytest.importorskip("torch", reason="the PyTorch reference (torch) is not installed in this environment")
    peft = pytest.importorskip("peft", reason="peft (the PyTorch reference for adapters) is not installed here")
    import transformers

    from flaxclf.inference import predict

    full = runs["full"]
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    batch = tok(["good fun", "a dull, boring and awful film", "great"], padding=True, return_tensors="np")
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    adapted = peft.PeftModel.from_pretrained(base, full / "adapter").eval()
    merged = transformers.AutoModelForSequenceClassification.from_pretrained(full / "export").eval()
    loaded = predict.load(str(full / "adapter"))
    assert loaded.label_names == ["neg", "pos"]  # from the adapter file's metadata, which peft ignores
    ours = np.asarray(loaded.model.apply(loaded.params, **{k: jnp.asarray(v) for k, v in batch.items()}))
    with torch.no_grad():
        inputs = {k: torch.tensor(v) for k, v in batch.items()}
        for theirs in (adapted(**inputs).logits.numpy(), merged(**inputs).logits.numpy()):
            np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_a_lora_run_refuses_a_base_whose_weights_changed(runs, tiny_model_dir, tmp_path):
    """Inference and resume check model.name's weights against the hash the run recorded."""
    from safetensors.numpy import save_file

    from flaxclf.config import from_dict
    from flaxclf.models.classifier import abstract_variables
    from flaxclf.training.checkpoint import check_compatible

    model, _, meta = run_files.load_params_for_inference(runs["full"])
    changed = Path(shutil.copytree(tiny_model_dir, tmp_path / "changed"))
    state = load_file(str(changed / "model.safetensors"))
    name = next(k for k in state if k.endswith("query.weight"))
    state[name] = state[name] + 1e-3
    save_file(state, str(changed / "model.safetensors"), metadata={"format": "pt"})
    shardings = sharding.tree_shardings(abstract_variables(model), _mesh((1, 1, 1)), ALL_RULES)
    with pytest.raises(CheckpointError, match="are not those this LoRA run adapted"):
        run_files.frozen_variables(model, changed, meta, shardings)
    with pytest.raises(CheckpointError, match=r"other settings \(the weights of model.name [^;]*\)"):
        check_compatible(meta, from_dict(meta["config"]), meta["label_names"], runs["full"],
                         weights.checkpoint_sha256(changed))
