"""The `flaxclf` command end to end, in real subprocesses: one shared tiny training run, then evaluate, predict,
export and inspect on it, bad arguments, and the pictures a run leaves."""

import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers import flaxclf, refused, summary

LABELS = ["very negative", "negative", "positive", "very positive"]  # rt-snippets-4way


def _trained(run_dir: Path) -> tuple[str, str]:
    """The stdout and stderr of the shared tiny run's `flaxclf train`."""
    out = json.loads((run_dir.parent / "train.out").read_text())
    return out["stdout"], out["stderr"]


def _best(run_dir: Path) -> str:
    return str(summary(run_dir)["best"]["step"])


def _gone(run_dir: Path) -> str:
    """A step the run went through whose checkpoint the keep policy deleted."""
    kept = {int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()}
    return str(min(set(range(1, summary(run_dir)["steps"] + 1)) - kept))


@pytest.fixture(scope="session")
def labelled_csv(tmp_path_factory) -> Path:
    """A user's own file: other column names, and only some of the model's labels."""
    path = tmp_path_factory.mktemp("csv") / "mine.csv"
    rows = [("a warm, witty film", "positive"), ("dull and far too long", "negative"),
            ("the best thing this year", "positive"), ("a mess", "negative"), ("quietly moving", "positive")]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(rows)
    return path


# ---------------------------------------------------------------------------------------------- train


def test_train_is_quiet_and_says_where_things_are(tiny_run):
    run_dir = tiny_run
    stdout, stderr = _trained(run_dir)
    noise = [line for line in stderr.splitlines()
             if any(w in line for w in ("Warning", "warn(", "absl", "orbax", "deprecat", "Traceback"))]
    assert not noise, stderr
    assert "best validation accuracy" in stdout
    assert f"run directory {run_dir}/" in stdout and "plots/" in stdout
    for name in ("config.yaml", "labels.json", "metrics.jsonl", "summary.json", "tb", "checkpoints", "export"):
        assert (run_dir / name).exists(), name


def test_train_does_not_import_torch(tiny_run):
    """tensorboardX imports torch whenever it is installed (it is, in the default environment); flaxclf's writer
    keeps it out: over a second of every run's start-up."""
    imported = json.loads((tiny_run.parent / "modules.json").read_text())
    assert "tensorboardX" in imported and "jax" in imported
    assert not [m for m in imported if m == "torch" or m.startswith("torch.")]


def test_train_draws_valid_pngs(tiny_run):
    run_dir = tiny_run
    for name in ("training.png", "eval.png", "confusion_matrix.png"):
        path = run_dir / "plots" / name
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] > 200 and im.size[1] > 200
    assert sorted(Path(x).name for x in json.loads((run_dir / "summary.json").read_text())["plots"]) == [
        "confusion_matrix.png", "eval.png", "training.png"]


def test_write_plots_from_records_alone(tmp_path):
    from flaxclf.training.plots import write_plots

    records = [{"step": s, "split": "train", "loss": 1.0 / s, "lr": 1e-4, "grad_norm": 0.5} for s in (1, 2, 3)]
    records += [{"step": 3, "split": "validation", "mse": 0.5, "pearson": 0.1, "count": 4}]  # regression: no matrix
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert [p.name for p in write_plots(tmp_path)] == ["training.png", "eval.png"]


# ---------------------------------------------------------------------------------------------- evaluate + export


def test_export_then_evaluate_checkpoint_and_folder_agree(tiny_run, labelled_csv, tmp_path):
    run_dir = tiny_run
    out = tmp_path / "hf"
    p = flaxclf("export", str(run_dir), str(out), "--step", _best(run_dir))
    assert p.returncode == 0, p.stderr
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {f.name for f in out.iterdir()}
    assert json.loads((out / "config.json").read_text())["id2label"] == {str(i): n for i, n in enumerate(LABELS)}

    data_args = ["--data", str(labelled_csv), "--text-column", "review", "--label-column", "sentiment"]
    p = flaxclf("evaluate", str(run_dir), "--step", _best(run_dir), *data_args, "--json", str(tmp_path / "ckpt.json"))
    assert p.returncode == 0, p.stderr
    assert "accuracy" in p.stdout and "confusion matrix" in p.stdout
    p = flaxclf("evaluate", str(out), *data_args, "--json", "-")
    assert p.returncode == 0, p.stderr
    from_folder, from_ckpt = json.loads(p.stdout), json.loads((tmp_path / "ckpt.json").read_text())
    assert from_folder["count"] == 5 and from_ckpt["count"] == 5
    # The file's labels (negative, positive) are mapped onto the model's four, not re-numbered 0, 1.
    assert sum(from_ckpt["confusion_matrix"][LABELS.index("positive")]) == 3
    assert from_folder["confusion_matrix"] == from_ckpt["confusion_matrix"]
    assert from_folder["accuracy"] == pytest.approx(from_ckpt["accuracy"])


# ---------------------------------------------------------------------------------------------- predict


def test_predict_stdin_lines_to_csv(tiny_run):
    run_dir = tiny_run
    p = flaxclf("predict", str(run_dir), stdin="a great film\n\nawful, just awful\n")
    assert p.returncode == 0, p.stderr
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert [r["text"] for r in rows] == ["a great film", "awful, just awful"]  # blank lines skipped
    for r in rows:
        probs = [float(r[f"prob_{n}"]) for n in LABELS]
        assert r["label"] == LABELS[probs.index(max(probs))]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_predict_csv_column_to_jsonl_with_progress(tiny_run, tmp_path):
    run_dir = tiny_run
    texts = [f"film number {i} " + "good " * (i % 40) for i in range(300)]  # several length buckets
    src = tmp_path / "in.csv"
    with src.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "review"])
        w.writerows(enumerate(texts))
    out = tmp_path / "out.jsonl"
    p = flaxclf("predict", str(run_dir), str(src), "--text-column", "review", "-o", str(out), "--batch-size", "32")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == texts  # input order, although batches group rows by length
    assert all(r["label"] in LABELS and set(r["probs"]) == set(LABELS) for r in rows)
    assert "text/s" in p.stderr  # the progress bar of a long input


# ---------------------------------------------------------------------------------------------- inspect


def test_inspect_run_dir_json(tiny_run):
    run_dir = tiny_run
    p = flaxclf("inspect", str(run_dir), "--text", "not bad at all", "--json", "-")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    assert out["pooling"] == "cls_pooler" and out["verdict"].startswith("Yes")
    changes = [q["logit_change"] for q in out["positions"]]
    assert changes[0] > 0 and all(c == 0.0 for c in changes[1:])
    assert any(q["pad"] for q in out["positions"])


def test_inspect_mean_text_table(tiny_model_dir):
    p = flaxclf("inspect", str(tiny_model_dir), "--pooling", "mean", "--text", "not bad at all", "--pad-to", "10")
    assert p.returncode == 0, p.stderr
    assert "masked mean over every non-pad position" in p.stdout and "classifier: dense 32 -> 2" in p.stdout
    assert "6-9  [PAD] x4" in p.stdout and "No: pooling=mean" in p.stdout


# ---------------------------------------------------------------------------------------------- bad input


def test_bad_arguments_one_line_exit_2(tiny_run):
    run_dir = tiny_run
    refused(flaxclf("predict", str(run_dir), "--format", "xml"), "predict", "--format", "xml")  # argparse's own
    refused(flaxclf("evaluate", str(run_dir / "nowhere")), "evaluate", "nowhere")  # a flaxclf error


@pytest.mark.parametrize("argv, expected", [
    (["train", "model.pooling=avg"], "model.pooling"),
    (["export", "{run}", "{run}/x", "--step", "{gone}"], "no checkpoint {gone}"),
    (["inspect", "{run}", "--pooling", "mean"], "drop --pooling"),
    (["predict", "{run}", "{run}/missing.txt"], "does not exist"),
])
def test_known_errors_in_process(tiny_run, capsys, argv, expected):
    from flaxclf.cli import main

    run_dir = tiny_run
    assert main([a.format(run=run_dir, gone=_gone(run_dir)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = expected.format(gone=_gone(run_dir))
    assert err[-1].startswith(f"flaxclf {argv[0]}: error: ") and expected in err[-1], err


def test_help_of_every_command():
    from flaxclf.cli import _parser

    for cmd in ("train", "evaluate", "predict", "export", "inspect"):
        with pytest.raises(SystemExit) as e:
            _parser().parse_args([cmd, "--help"])
        assert e.value.code == 0


def test_read_inputs_names_the_missing_column(tmp_path):
    from flaxclf.data import DataError, read_texts

    path = tmp_path / "x.jsonl"
    path.write_text('{"review": "fine"}\n')
    with pytest.raises(DataError, match=r"has no column 'text' \(--text-column\); its columns are 'review'"):
        read_texts(str(path), None, "text", None)
