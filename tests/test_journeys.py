"""User journeys: sequences of real `flaxclf` commands, as a user types them, with assertions on what the user
gets (files, exit codes, numbers). Each journey is a path that broke once or that loses work when it breaks:
a best step before the last, a kill -9 mid-run, a rerun with a changed setting, export into every kind of
folder, pandas-written files, stdin, and a fresh start in a used directory."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from tests.torch_ref import needs_torch

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict:
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "flaxclf.cli", *map(str, args)]


def flaxclf(*args, cwd: Path = ROOT, stdin: str | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_cmd(*args), input=stdin, capture_output=True, text=True, cwd=cwd, env=_env(),
                          timeout=timeout)


def _ok(p: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _refused(p: subprocess.CompletedProcess, command: str, *fragments: str) -> str:
    """The one-line error of a refused command (exit code 2, no traceback); returns it."""
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flaxclf {command}: error: "), p.stderr
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def tree_hash(folder: Path) -> str:
    """A hash of every path and byte under a folder: 'left as it was' means this did not change."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        h.update(str(p.relative_to(folder)).encode() + b"\0")
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _weights(folder: Path) -> dict[str, np.ndarray]:
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        np.testing.assert_array_equal(wa[k], wb[k], err_msg=k)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]


def _train_args(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return ["train", "--config", ROOT / "configs/tiny.yaml", f"model.name={model_dir}", f"train.output_dir={run_dir}",
            "data.max_length=32", "data.buckets=[16,32]", "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------- best step


@pytest.fixture(scope="module")
def early_best_run(tmp_path_factory, tiny_model_dir) -> Path:
    """A run whose best validation step (5) is earlier than its last: a learning rate far too high."""
    run_dir = tmp_path_factory.mktemp("journey") / "early-best"
    _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=6", "train.eval_every=1",
                             "checkpoint.every_steps=2", "optim.learning_rate=0.3", "optim.schedule=constant",
                             "optim.warmup_ratio=0")))
    return run_dir


def test_a_best_step_before_the_last_exports_and_evaluates_the_best(early_best_run, tmp_path):
    run_dir = early_best_run
    summary = json.loads((run_dir / "summary.json").read_text())
    val = {r["step"]: r["accuracy"] for r in _records(run_dir) if r["split"] == "validation"}
    best_step = max(sorted(val), key=lambda s: (val[s], s))
    assert best_step < summary["steps"] == 6, f"precondition: the best step must not be the last ({val})"
    assert summary["best"]["step"] == best_step and summary["exported"] == f"best (step {best_step})"
    assert summary["validation"]["accuracy"] == pytest.approx(val[best_step], abs=1e-6)
    # The export holds the best checkpoint's params, and test was scored on them.
    _ok(flaxclf("export", run_dir, tmp_path / "best", "--step", "best"))
    _same_weights(run_dir / "export", tmp_path / "best")
    scored = json.loads(_ok(flaxclf("evaluate", run_dir, "--step", "best", "--split", "test", "--json", "-",
                                    "--no-progress")).stdout)
    assert summary["test"]["accuracy"] == pytest.approx(scored["accuracy"], abs=1e-6)
    records = _records(run_dir)
    assert {r["split"] for r in records} >= {"train", "validation", "validation_best", "test_best"}


def _scalar_events(tb_dir: Path) -> list[tuple[str, int]]:
    """(tag, step) of every scalar in a TensorBoard folder (TFRecord framing: length, crc, event, crc)."""
    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        raw, i = path.read_bytes(), 0
        while i < len(raw):
            n = int.from_bytes(raw[i:i + 8], "little")
            event = event_pb2.Event.FromString(raw[i + 12:i + 12 + n])
            out += [(v.tag, event.step) for v in event.summary.value]
            i += 12 + n + 4
    return out


def test_tensorboard_tags_are_namespaced_by_split(early_best_run):
    events = _scalar_events(early_best_run / "tb")
    tags = {tag for tag, _ in events}
    assert {"train/loss", "validation/accuracy", "validation_best/accuracy", "test_best/accuracy"} <= tags
    assert all(t.split("/")[0] in ("train", "validation", "validation_best", "test_best") for t in tags), tags
    assert [s for t, s in events if t == "validation/accuracy"] == [1, 2, 3, 4, 5, 6]


def test_exported_files_are_readable_by_the_group_and_others(early_best_run):
    umask = os.umask(0)
    os.umask(umask)
    for p in (early_best_run / "export").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ---------------------------------------------------------------------------------------------- kill -9


def kill_9_after(model_dir: Path, run_dir: Path, step: int, *extra: str) -> None:
    """Starts the training command and sends it SIGKILL once metrics.jsonl has logged `step`."""
    proc = subprocess.Popen(_cmd(*_train_args(model_dir, run_dir, *extra)), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = [r["step"] for r in _records(run_dir)] if (run_dir / "metrics.jsonl").is_file() else []
        if steps and max(steps) >= step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "precondition: the run must still be going when it is killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "summary.json").exists()


def test_kill_9_mid_run_then_the_same_command_finishes_as_an_uninterrupted_run(tmp_path, tiny_model_dir):
    extra = ("train.max_steps=40", "train.eval_every=20", "train.log_every=1", "checkpoint.every_steps=4")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(flaxclf(*_train_args(tiny_model_dir, whole, *extra)))
    kill_9_after(tiny_model_dir, killed, 10, *extra)
    again = _ok(flaxclf(*_train_args(tiny_model_dir, killed, *extra)))
    assert "resumed from" in again.stdout + again.stderr
    _same_weights(whole / "export", killed / "export")
    want = [r for r in _records(whole) if r["split"] != "train"]
    got = [r for r in _records(killed) if r["split"] != "train"]
    assert [(r["step"], r["split"], r.get("accuracy")) for r in got] == \
        [(r["step"], r["split"], r.get("accuracy")) for r in want]
    assert [r["step"] for r in _records(killed) if r["split"] == "train"] == list(range(1, 41))


# ---------------------------------------------------------------------------------------------- reruns


def test_a_changed_model_field_is_refused_untouched_and_the_original_resumes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    base = ("checkpoint.every_steps=2", "train.eval_every=2")
    _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=4", *base)))
    before = tree_hash(run_dir)
    _refused(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=6", "model.pooling=mean", *base)),
             "train", str(run_dir), "model.pooling: cls_pooler -> mean", "checkpoint.fresh=true")
    _refused(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=6", "data.max_length=24",
                                  "train.seed=3", *base)),
             "train", "data.max_length: 32 -> 24", "train.seed: 0 -> 3")
    assert tree_hash(run_dir) == before and not (tmp_path / "run" / "checkpoints.unreadable").exists()
    again = _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=6", *base)))
    assert f"resumed from {run_dir / 'checkpoints' / '4'} at step 4 of 6" in again.stdout
    assert [r["step"] for r in _records(run_dir) if r["split"] == "validation"] == [2, 4, 6]


def test_fresh_start_in_a_used_directory(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    base = ("checkpoint.every_steps=2", "train.eval_every=2")
    _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=4", *base)))
    (run_dir / "notes.txt").write_text("mine")
    out = _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "train.max_steps=2", "model.pooling=mean",
                                   "checkpoint.fresh=true", *base)))
    assert "training 2 steps from step 0" in out.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in _records(run_dir) if r["split"] == "validation"] == [2]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def test_train_never_overwrites_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: settings\n")
    (project / "notes.md").write_text("mine")
    before = tree_hash(project)
    _refused(flaxclf(*_train_args(tiny_model_dir, project, "train.max_steps=2")), "train", str(project),
             "holds config.yaml, which flaxclf did not write")
    assert tree_hash(project) == before
    (project / "config.yaml").unlink()
    _ok(flaxclf(*_train_args(tiny_model_dir, ".", "train.max_steps=2", "train.eval_every=2"), cwd=project))
    assert (project / "notes.md").read_text() == "mine" and (project / "export" / "model.safetensors").is_file()
    again = _ok(flaxclf(*_train_args(tiny_model_dir, ".", "train.max_steps=2", "train.eval_every=2"), cwd=project))
    assert "resumed from" in again.stdout


# ---------------------------------------------------------------------------------------------- export


def test_export_into_every_kind_of_folder(early_best_run, tmp_path):
    run = early_best_run
    new = tmp_path / "new" / "deeper"
    _ok(flaxclf("export", run, new))
    latest = flaxclf("export", run, tmp_path / "latest", "--step", "last")
    _ok(latest)
    _same_weights(new, tmp_path / "latest")
    empty = tmp_path / "empty"
    empty.mkdir()
    _ok(flaxclf("export", run, empty))
    _same_weights(new, empty)
    # An earlier export is replaced whole: a file the earlier one wrote and this one doesn't is gone.
    (empty / "vocab.txt").unlink()
    manifest = json.loads((empty / ".flaxclf-export.json").read_text())
    assert "model.safetensors" in manifest["files"]
    _ok(flaxclf("export", run, empty, "--step", "best"))
    _same_weights(run / "export", empty)
    assert (empty / "vocab.txt").is_file()
    # A folder with the user's own files: refused, nothing touched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.docx").write_bytes(b"the user's")
    (mine / "config.json").write_text("{}")
    before = tree_hash(mine)
    _refused(flaxclf("export", run, mine), "export", str(mine), "report.docx", "new or empty folder")
    assert tree_hash(mine) == before
    # ".", relative paths, and a path that is a file.
    here = tmp_path / "here"
    here.mkdir()
    out = _ok(flaxclf("export", run, ".", cwd=here))
    assert str(here) in out.stdout
    _same_weights(new, here)
    _ok(flaxclf("export", run, "rel/out", cwd=here))
    _same_weights(new, here / "rel" / "out")
    (tmp_path / "a-file").write_text("x")
    _refused(flaxclf("export", run, tmp_path / "a-file"), "export", "is a file")
    assert (tmp_path / "a-file").read_text() == "x"
    assert not [p for p in tmp_path.rglob("*flaxclf-export.tmp*")]


def test_export_onto_a_full_disk_leaves_nothing_behind(early_best_run, tmp_path):
    """A disk that fills up mid-export (simulated with a file-size limit): one line, no half-written folder."""
    import shlex

    # SIGXFSZ ignored: a write past the limit then fails with EFBIG instead of killing the process. A shell sets
    # both, since a preexec_fn would fork this multithreaded (jax) process.
    script = "ulimit -f 100; trap '' XFSZ; exec " + shlex.join(_cmd("export", early_best_run, "out"))
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=_env(), timeout=300)
    _refused(p, "export", str(tmp_path / "out"), "File too large", "choose another folder")
    assert list(tmp_path.iterdir()) == []


def test_exports_load_in_pytorch(early_best_run):
    torch = needs_torch()
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(str(early_best_run / "export"),
                                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert isinstance(model, torch.nn.Module)


# ---------------------------------------------------------------------------------------------- files


def _user_table() -> "pd.DataFrame":  # noqa: F821
    pd = pytest.importorskip("pandas")
    texts = ['a "great" film,\nsaid nobody', "flat\tand dull", "héllo wörld — 良い", "  padded  ", 'plain',
             "comma, separated, text", "line one\r\nline two", '""double""', "tab\tand \"quote\"", "ok"]
    labels = ["pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg", "pos", "neg"]
    return pd.DataFrame({"text": texts * 3, "label": labels * 3})


@pytest.mark.parametrize("kind", ["pandas-tsv", "pandas-csv-bom-crlf"])
def test_pandas_files_through_train_evaluate_and_predict(kind, tmp_path, tiny_model_dir):
    df = _user_table()
    path = tmp_path / ("data.tsv" if kind == "pandas-tsv" else "data.csv")
    if kind == "pandas-tsv":
        df.to_csv(path, sep="\t")  # quoted fields, an unnamed index column
    else:
        df.to_csv(path, index=False, encoding="utf-8-sig", lineterminator="\r\n")
    run_dir = tmp_path / "run"
    _ok(flaxclf(*_train_args(tiny_model_dir, run_dir, "data.task=null", f"data.train_file={path}",
                             f"data.validation_file={path}", "train.max_steps=2", "train.eval_every=2",
                             "train.global_batch_size=8")))
    records = _records(run_dir)
    assert [r["count"] for r in records if r["split"] == "validation"] == [len(df)]
    scored = json.loads(_ok(flaxclf("evaluate", run_dir, "--data", path, "--json", "-", "--no-progress")).stdout)
    assert scored["count"] == len(df)
    predicted = _ok(flaxclf("predict", run_dir, path, "--format", "jsonl", "--no-progress")).stdout
    rows = [json.loads(line) for line in predicted.splitlines()]
    assert [r["text"] for r in rows] == list(df["text"])


def test_predict_from_stdin_and_from_a_file_agree(early_best_run, tmp_path):
    texts = ["a warm, witty film", "dull and far too long", "   ", "héllo — 良い", "the best thing this year"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    from_file = _ok(flaxclf("predict", early_best_run, path, "--no-progress"))
    from_stdin = _ok(flaxclf("predict", early_best_run, "-", "--no-progress", stdin="\n".join(texts) + "\n"))
    assert from_file.stdout == from_stdin.stdout
    assert len(from_file.stdout.strip().splitlines()) == 1 + 4  # header + the non-blank lines
