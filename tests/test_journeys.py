"""User journeys: sequences of real `flaxclf` commands, as a user types them, with assertions on what the user
gets (files, exit codes, numbers). Each journey is a path that broke once or that loses work when it breaks:
a best step before the last, a rerun with a changed setting, export into every kind of folder, pandas-written
files, stdin, and a fresh start in a used directory. (A kill -9 mid-run, then the same command, is the journey
of test_checkpoint.py::test_killed_run_resumes_bit_for_bit.) The journeys that read a finished run share the
session's tiny run (conftest.tiny_run)."""

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import (
    child_env,
    command,
    flaxclf,
    ok,
    records,
    refused,
    same_weights,
    summary,
    train_args,
    tree_hash,
)
from tests.torch_ref import needs_torch

pytestmark = pytest.mark.journey


# ---------------------------------------------------------------------------------------------- best step


def test_a_best_step_before_the_last_exports_and_evaluates_the_best(tiny_run, tmp_path):
    run_dir = tiny_run
    run = summary(run_dir)
    val = {r["step"]: r["accuracy"] for r in records(run_dir) if r["split"] == "validation"}
    best_step = max(sorted(val), key=lambda s: (val[s], s))
    assert best_step < run["steps"] == 6, f"precondition: the best step must not be the last ({val})"
    assert run["best"]["step"] == best_step and run["exported"] == f"best (step {best_step})"
    assert run["validation"]["accuracy"] == pytest.approx(val[best_step], abs=1e-6)
    # The export holds the best checkpoint's params, and test was scored on them.
    ok(flaxclf("export", run_dir, tmp_path / "best", "--step", "best"))
    same_weights(run_dir / "export", tmp_path / "best")
    scored = json.loads(ok(flaxclf("evaluate", run_dir, "--step", "best", "--split", "test", "--json", "-",
                                    "--no-progress")).stdout)
    assert run["test"]["accuracy"] == pytest.approx(scored["accuracy"], abs=1e-6)
    assert {r["split"] for r in records(run_dir)} >= {"train", "validation", "validation_best", "test_best"}


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


def test_tensorboard_tags_are_namespaced_by_split(tiny_run):
    events = _scalar_events(tiny_run / "tb")
    tags = {tag for tag, _ in events}
    assert {"train/loss", "validation/accuracy", "validation_best/accuracy", "test_best/accuracy"} <= tags
    assert all(t.split("/")[0] in ("train", "validation", "validation_best", "test_best") for t in tags), tags
    assert [s for t, s in events if t == "validation/accuracy"] == [1, 2, 3, 4, 5, 6]


def test_exported_files_are_readable_by_the_group_and_others(tiny_run):
    umask = os.umask(0)
    os.umask(umask)
    for p in (tiny_run / "export").iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, p


# ---------------------------------------------------------------------------------------------- reruns


def test_a_changed_model_field_is_refused_untouched_and_the_original_resumes(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    base = ("checkpoint.every_steps=2", "train.eval_every=2")
    ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=4", *base)))
    before = tree_hash(run_dir)
    refused(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=6", "model.pooling=mean", *base)),
             "train", str(run_dir), "model.pooling: cls_pooler -> mean", "checkpoint.fresh=true")
    refused(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=6", "data.max_length=24",
                                  "train.seed=3", *base)),
             "train", "data.max_length: 32 -> 24", "train.seed: 0 -> 3")
    assert tree_hash(run_dir) == before and not (tmp_path / "run" / "checkpoints.unreadable").exists()
    again = ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=6", *base)))
    assert f"resumed from {run_dir / 'checkpoints' / '4'} at step 4 of 6" in again.stdout
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [2, 4, 6]


def test_fresh_start_in_a_used_directory(tmp_path, tiny_model_dir):
    run_dir = tmp_path / "run"
    base = ("checkpoint.every_steps=2", "train.eval_every=2")
    ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=4", *base)))
    (run_dir / "notes.txt").write_text("mine")
    out = ok(flaxclf(*train_args(tiny_model_dir, run_dir, "train.max_steps=2", "model.pooling=mean",
                                   "checkpoint.fresh=true", *base)))
    assert "training 2 steps from step 0" in out.stdout
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["2"]
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [2]
    assert (run_dir / "notes.txt").read_text() == "mine"
    assert len(list((run_dir / "tb").glob("events.out.tfevents.*"))) == 1
    assert summary(run_dir)["steps"] == 2


def test_train_never_overwrites_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    project = tmp_path / "project"
    project.mkdir()
    (project / "config.yaml").write_text("my: settings\n")
    (project / "notes.md").write_text("mine")
    before = tree_hash(project)
    refused(flaxclf(*train_args(tiny_model_dir, project, "train.max_steps=2")), "train", str(project),
             "holds config.yaml, which flaxclf did not write")
    assert tree_hash(project) == before
    (project / "config.yaml").unlink()
    ok(flaxclf(*train_args(tiny_model_dir, ".", "train.max_steps=2", "train.eval_every=2"), cwd=project))
    assert (project / "notes.md").read_text() == "mine" and (project / "export" / "model.safetensors").is_file()
    again = ok(flaxclf(*train_args(tiny_model_dir, ".", "train.max_steps=2", "train.eval_every=2"), cwd=project))
    assert "resumed from" in again.stdout


# ---------------------------------------------------------------------------------------------- export


def test_export_into_every_kind_of_folder(tiny_run, tmp_path):
    run = tiny_run
    new = tmp_path / "new" / "deeper"
    ok(flaxclf("export", run, new))
    latest = flaxclf("export", run, tmp_path / "latest", "--step", "last")
    ok(latest)
    same_weights(new, tmp_path / "latest")
    empty = tmp_path / "empty"
    empty.mkdir()
    ok(flaxclf("export", run, empty))
    same_weights(new, empty)
    # An earlier export is replaced whole: a file the earlier one wrote and this one doesn't is gone.
    (empty / "vocab.txt").unlink()
    manifest = json.loads((empty / ".flaxclf-export.json").read_text())
    assert "model.safetensors" in manifest["files"]
    ok(flaxclf("export", run, empty, "--step", "best"))
    same_weights(run / "export", empty)
    assert (empty / "vocab.txt").is_file()
    # A folder with the user's own files: refused, nothing touched.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.docx").write_bytes(b"the user's")
    (mine / "config.json").write_text("{}")
    before = tree_hash(mine)
    refused(flaxclf("export", run, mine), "export", str(mine), "report.docx", "new or empty folder")
    assert tree_hash(mine) == before
    # ".", relative paths, and a path that is a file.
    here = tmp_path / "here"
    here.mkdir()
    out = ok(flaxclf("export", run, ".", cwd=here))
    assert str(here) in out.stdout
    same_weights(new, here)
    ok(flaxclf("export", run, "rel/out", cwd=here))
    same_weights(new, here / "rel" / "out")
    (tmp_path / "a-file").write_text("x")
    refused(flaxclf("export", run, tmp_path / "a-file"), "export", "is a file")
    assert (tmp_path / "a-file").read_text() == "x"
    assert not [p for p in tmp_path.rglob("*flaxclf-export.tmp*")]


def test_export_onto_a_full_disk_leaves_nothing_behind(tiny_run, tmp_path):
    """A disk that fills up mid-export (simulated with a file-size limit): one line, no half-written folder."""
    import shlex

    # SIGXFSZ ignored: a write past the limit then fails with EFBIG instead of killing the process. A shell sets
    # both, since a preexec_fn would fork this multithreaded (jax) process.
    script = "ulimit -f 100; trap '' XFSZ; exec " + shlex.join(command("export", tiny_run, "out"))
    p = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=child_env(),
                       timeout=300)
    refused(p, "export", str(tmp_path / "out"), "File too large", "choose another folder")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.hf
def test_exports_load_in_pytorch(tiny_run):
    torch = needs_torch()
    from transformers import AutoModelForSequenceClassification

    model, info = AutoModelForSequenceClassification.from_pretrained(str(tiny_run / "export"),
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
    ok(flaxclf(*train_args(tiny_model_dir, run_dir, "data.task=null", f"data.train_file={path}",
                             f"data.validation_file={path}", "train.max_steps=2", "train.eval_every=2",
                             "train.global_batch_size=8")))
    assert [r["count"] for r in records(run_dir) if r["split"] == "validation"] == [len(df)]
    scored = json.loads(ok(flaxclf("evaluate", run_dir, "--data", path, "--json", "-", "--no-progress")).stdout)
    assert scored["count"] == len(df)
    predicted = ok(flaxclf("predict", run_dir, path, "--format", "jsonl", "--no-progress")).stdout
    rows = [json.loads(line) for line in predicted.splitlines()]
    assert [r["text"] for r in rows] == list(df["text"])


def test_predict_from_stdin_and_from_a_file_agree(tiny_run, tmp_path):
    texts = ["a warm, witty film", "dull and far too long", "   ", "héllo — 良い", "the best thing this year"]
    path = tmp_path / "texts.txt"
    path.write_text("\n".join(texts) + "\n", encoding="utf-8")
    from_file = ok(flaxclf("predict", tiny_run, path, "--no-progress"))
    from_stdin = ok(flaxclf("predict", tiny_run, "-", "--no-progress", stdin="\n".join(texts) + "\n"))
    assert from_file.stdout == from_stdin.stdout
    assert len(from_file.stdout.strip().splitlines()) == 1 + 4  # header + the non-blank lines


# ---------------------------------------------------------------------------------------------- the console


_BAR = re.compile(r"\d+/\d+ \[")  # tqdm's "3/4 [00:01<00:00, ..."


def _visible(raw: str) -> list[str]:
    """What a terminal shows of a stream: each line is what its last carriage return left (bar redraws and
    tqdm's blank-outs collapse), blank lines dropped."""
    lines = [line.rsplit("\r", 1)[-1].rstrip() for line in raw.replace("\r\n", "\n").split("\n")]
    return [line for line in lines if line.strip()]


def test_progress_bar_and_lines_in_a_terminal_and_in_a_file(tiny_model_dir, tmp_path):
    """With the bar on: in a terminal (a pty) every line said or logged is a line of its own, the bar's last state
    comes once, before the end-of-run summary, and nothing of the bar is drawn after it; in a file (stdout and
    stderr into one, as `make train > log 2>&1`), the lines said before training carry no bar, and no bar follows
    the summary either."""
    import fcntl
    import pty
    import struct
    import termios

    args = [a for a in train_args(tiny_model_dir, tmp_path / "tty", "train.max_steps=4", "train.eval_every=2",
                                  "data.buckets=[32]") if a != "--no-progress"]
    main, sub = pty.openpty()
    fcntl.ioctl(sub, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 40 rows of 120 columns
    p = subprocess.Popen(command(*args), stdin=subprocess.DEVNULL, stdout=sub, stderr=sub, env=child_env())
    os.close(sub)
    chunks = []
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main)
    assert p.wait(timeout=600) == 0, b"".join(chunks)[-3000:]
    shown = _visible(b"".join(chunks).decode())
    done = next(i for i, line in enumerate(shown) if line.startswith("done: 4 steps"))
    bars = [i for i, line in enumerate(shown) if _BAR.search(line)]
    assert bars and max(bars) < done, shown  # nothing of the bar after the summary
    assert [line for line in shown if "4/4 [" in line] == [shown[max(bars)]], shown  # its last state, once
    for said in ("training 4 steps from step 0", "step 2 validation:", "step 4 validation:"):
        assert any(line.startswith(said) for line in shown), (said, shown)
    assert not [line for line in shown if _BAR.search(line) and ("validation" in line or "training" in line)]

    log = tmp_path / "log"
    with log.open("w") as f:
        ok(subprocess.run(command(*[a.replace("/tty", "/file") for a in map(str, args)]), stdout=f, stderr=f,
                          env=child_env(), timeout=600, text=True))
    raw = log.read_text()
    before, after = raw.split("done: 4 steps", 1)
    assert not _BAR.search(after) and "\r" not in after
    (training,) = [line for line in raw.split("\n") if "training 4 steps from step 0" in line]
    assert training.startswith("training 4 steps"), repr(training)  # said before the bar is drawn
