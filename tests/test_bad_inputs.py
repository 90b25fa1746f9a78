"""Bad input, one kind per case, through the real `flaxclf` command: each must stop with exit code 2 and ONE line
on stderr, `flaxclf COMMAND: error: <sentence>`, that names the offending file, line, key or value, with no
traceback, and must leave every folder it was given byte for byte as it was (a finished run, the user's own
folders, the input files).

The kinds (case ids below):

data files, through `flaxclf train` (data.task=null data.train_file=...), `evaluate RUN --data` and `predict RUN`:
    missing file, empty file, header only, wrong field count in a CSV row, non-UTF-8 bytes, missing text column,
    missing label column, empty text, missing label, JSONL line that is not JSON, JSONL line that is a list,
    unknown extension, a validation label never seen in training, labels the model does not know, a folder
    given as a file, a header that names a column twice
config: YAML syntax error in --config, unknown key (with did-you-mean), wrong type, bad literal, a --config file
    that does not exist, mesh sizes that do not fit the devices, packed rows shorter than a text
CLI arguments: unknown subcommand, --step that is not a step, --text-pair-column on plain lines, an unrecognized
    option
model folders: a model.name path that does not exist, a folder without config.json, a folder without tokenizer
    files, a name that is neither packaged nor reachable on the hub
run directories: evaluate / predict / export on a folder that is not a run directory, --step 999, export into a
    folder of the user's own files or onto a file, a rerun of train into the finished run with another
    model.pooling or data.max_length

Every case runs in its own copy of one world (the input files, the user's folders, the model folders with a part
missing, and, where it names {run}, a copy of the session's tiny run, conftest.tiny_run), so that what a case
changed is its own; the cases run two at a time, since each subprocess spends seconds importing jax.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import TINY_RUN_ARGS, flaxclf

COMMANDS = ("train", "evaluate", "predict", "export", "inspect")


def tree_state(root: Path) -> dict[str, str]:
    """Every path under `root`, relative -> the sha256 of its bytes, or "dir"."""
    return {p.relative_to(root).as_posix(): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _changes(before: dict[str, str], after: dict[str, str]) -> list[str]:
    return ([f"added {p}" for p in sorted(after.keys() - before.keys())]
            + [f"removed {p}" for p in sorted(before.keys() - after.keys())]
            + [f"changed {p}" for p in sorted(before.keys() & after.keys()) if before[p] != after[p]])


# ---------------------------------------------------------------------------------------------- the world

# The arguments of the session's shared tiny run (conftest.tiny_run), so that a rerun into it differs only in what
# a case changes.
TRAIN_ARGS = ("--config", "configs/tiny.yaml", "model.name={model}", "train.output_dir={run}", "data.max_length=32",
              "data.buckets=[16,32]", "--no-progress", *TINY_RUN_ARGS)

DATA_FILES: dict[str, bytes] = {
    "good.csv": b'text,label\n"a warm, witty film",pos\ndull and far too long,neg\nquietly moving,pos\n',
    "empty.csv": b"",
    "header-only.csv": b"text,label\n",
    "fields.csv": b"text,label\nfine,pos\na warm, witty film,pos\n",  # line 3: the comma splits the text
    "latin1.csv": b"text,label\nfine,pos\ncaf\xe9 au lait,neg\n",  # line 3: latin-1, not UTF-8
    "no-text.csv": b"review,label\nfine,pos\nbad,neg\n",
    "no-label.csv": b"text,sentiment\nfine,pos\nbad,neg\n",
    "empty-text.csv": b'text,label\nfine,pos\n"",neg\n',  # line 3
    "missing-label.csv": b"text,label\nfine,pos\nbad,\n",  # line 3
    "not-json.jsonl": b'{"text": "fine", "label": "pos"}\n{"text": "bad", "label": neg}\n',  # line 2
    "list.jsonl": b'{"text": "fine", "label": "pos"}\n["bad", "neg"]\n',  # line 2
    "data.xml": b"<rows><row>fine</row></rows>\n",
    "unseen-label.csv": b"text,label\nfine,pos\nso-so,neutral\n",  # line 3: no neutral row in good.csv
    "twice.csv": b"text,label,text\nfine,pos,again\n",
    "texts.txt": b"a great film\nawful, just awful\n",
    "blank.txt": b"\n  \n\n",
    "no-text.jsonl": b'{"review": "fine"}\n{"review": "bad"}\n',
    "other-labels.csv": b"text,label\nfine,superb\nbad,dreadful\n",  # the run's labels are rt-snippets-4way's
    "bad.yaml": b"train:\n  epochs: [1, 2\n  seed: 0\n",
}


def _build_static(world: Path, model: Path) -> None:
    """The input files, the user's own folders, and the model folders with a part missing."""
    files = world / "files"
    files.mkdir(parents=True)
    for name, raw in DATA_FILES.items():
        (files / name).write_bytes(raw)
    (files / "a-folder").mkdir()
    (files / "a-folder" / "part-0.csv").write_bytes(DATA_FILES["good.csv"])
    (world / "not-a-run").mkdir()
    (world / "not-a-run" / "notes.txt").write_text("my own notes\n")
    (world / "user-export").mkdir()
    (world / "user-export" / "thesis.tex").write_text("\\documentclass{article}\n")
    (world / "notes.txt").write_text("a file, not a folder\n")
    shutil.copytree(model, world / "model-no-config")
    (world / "model-no-config" / "config.json").unlink()
    shutil.copytree(model, world / "model-no-tokenizer")
    for name in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (world / "model-no-tokenizer" / name).unlink(missing_ok=True)


def _subs(world: Path, model: Path) -> dict[str, str]:
    """The {placeholders} of the cases' arguments and expected names."""
    return {"model": str(model), "run": str(world / "run"), "d": str(world / "files"), "fresh": str(world / "new"),
            "not_run": str(world / "not-a-run"), "user_dir": str(world / "user-export"),
            "a_file": str(world / "notes.txt"), "no_config": str(world / "model-no-config"),
            "no_tokenizer": str(world / "model-no-tokenizer")}


# ---------------------------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class Case:
    id: str
    argv: tuple[str, ...]  # with {placeholders} of _subs
    names: tuple[str, ...]  # what the error line must contain (with placeholders too)

    @property
    def command(self) -> str | None:
        return self.argv[0] if self.argv[0] in COMMANDS else None

    @property
    def needs_run(self) -> bool:
        return any("{run}" in a for a in self.argv)


def _train_data(*overrides: str) -> tuple[str, ...]:
    """Train on the user's files into the finished run: a data error must come before anything is written."""
    return ("train", *TRAIN_ARGS, "data.task=null", *overrides)


def _train_new(*overrides: str) -> tuple[str, ...]:
    """Train into a new folder, which a refused run must not create."""
    return ("train", "--config", "configs/tiny.yaml", "model.name={model}", "train.output_dir={fresh}",
            "--no-progress", *overrides)


def _evaluate(file: str, *more: str) -> tuple[str, ...]:
    return ("evaluate", "{run}", "--data", file, *more, "--no-progress")


def _predict(file: str, *more: str) -> tuple[str, ...]:
    return ("predict", "{run}", file, *more, "--no-progress")


CASES = [
    # -- data files
    Case("train-missing-file", _train_data("data.train_file={d}/nowhere.csv"), ("{d}/nowhere.csv", "does not exist")),
    Case("train-empty-file", _train_data("data.train_file={d}/empty.csv"), ("{d}/empty.csv", "empty")),
    Case("train-header-only", _train_data("data.train_file={d}/header-only.csv"), ("{d}/header-only.csv", "no rows")),
    Case("train-field-count", _train_data("data.train_file={d}/fields.csv"), ("{d}/fields.csv line 3", "3 fields")),
    Case("train-not-utf8", _train_data("data.train_file={d}/latin1.csv"), ("{d}/latin1.csv line 3", "0xe9", "UTF-8")),
    Case("train-no-text-column", _train_data("data.train_file={d}/no-text.csv"),
         ("{d}/no-text.csv", "'text'", "data.text_column", "'review'")),
    Case("train-no-label-column", _train_data("data.train_file={d}/no-label.csv"),
         ("{d}/no-label.csv", "'label'", "data.label_column", "'sentiment'")),
    Case("train-empty-text", _train_data("data.train_file={d}/empty-text.csv"),
         ("{d}/empty-text.csv line 3", "empty text")),
    Case("train-missing-label", _train_data("data.train_file={d}/missing-label.csv"),
         ("{d}/missing-label.csv line 3", "no label")),
    Case("train-jsonl-not-json", _train_data("data.train_file={d}/not-json.jsonl"),
         ("{d}/not-json.jsonl line 2", "JSON")),
    Case("train-jsonl-list", _train_data("data.train_file={d}/list.jsonl"), ("{d}/list.jsonl line 2", "list")),
    Case("train-unknown-extension", _train_data("data.train_file={d}/data.xml"),
         ("{d}/data.xml", "'.xml'", "data.format")),
    Case("train-unseen-validation-label",
         _train_data("data.train_file={d}/good.csv", "data.validation_file={d}/unseen-label.csv"),
         ("{d}/unseen-label.csv line 3", "'neutral'")),
    Case("train-folder-as-csv", _train_data("data.train_file={d}/a-folder", "data.format=csv"),
         ("{d}/a-folder", "folder")),
    Case("train-header-twice", _train_data("data.train_file={d}/twice.csv"), ("{d}/twice.csv", "'text'", "twice")),
    Case("evaluate-missing-file", _evaluate("{d}/nowhere.csv"), ("--data {d}/nowhere.csv", "does not exist")),
    Case("evaluate-no-label-column", _evaluate("{d}/no-label.csv"), ("{d}/no-label.csv", "'label'", "'sentiment'")),
    Case("evaluate-labels-the-model-lacks", _evaluate("{d}/other-labels.csv"), ("{d}/other-labels.csv", "superb")),
    Case("predict-blank-file", _predict("{d}/blank.txt"), ("{d}/blank.txt", "no text")),
    Case("predict-not-utf8", _predict("{d}/latin1.csv"), ("{d}/latin1.csv line 3", "0xe9")),
    Case("predict-no-text-column", _predict("{d}/no-text.jsonl"), ("{d}/no-text.jsonl", "'text'", "'review'")),
    Case("predict-jsonl-not-json", _predict("{d}/not-json.jsonl"), ("{d}/not-json.jsonl line 2", "JSON")),
    Case("predict-folder-as-file", _predict("{d}/a-folder"), ("{d}/a-folder", "folder")),
    # -- config
    Case("config-yaml-syntax", _train_new("--config", "{d}/bad.yaml"), ("{d}/bad.yaml", "line 3", "YAML")),
    Case("config-unknown-key", _train_new("train.epochz=3"), ("train.epochz", "did you mean 'epochs'")),
    Case("config-wrong-type", _train_new("train.epochs=abc"), ("train.epochs", "'abc'", "integer")),
    Case("config-bad-literal", _train_new("model.pooling=avg"), ("model.pooling", "'avg'", "'cls_pooler'")),
    Case("config-file-missing", ("train", "--config", "{d}/nowhere.yaml", "train.output_dir={fresh}"),
         ("{d}/nowhere.yaml", "does not exist")),
    Case("config-mesh-does-not-fit", _train_new("mesh.data=3"), ("data=3", "1 available device")),
    Case("config-packing-length-too-short", _train_new("data.packing_length=8"),
         ("train split", "data.packing_length 8", "set it to null")),
    # -- command-line arguments
    Case("cli-unknown-subcommand", ("frobnicate", "{d}/texts.txt"), ("'frobnicate'",)),
    Case("cli-step-not-a-step", ("evaluate", "{run}", "--step", "xyz"), ("--step", "'xyz'")),
    Case("cli-pair-column-on-lines", _predict("{d}/texts.txt", "--text-pair-column", "b"),
         ("{d}/texts.txt", "--text-pair-column")),
    Case("cli-unrecognized-option", _predict("{d}/texts.txt", "--colour", "red"), ("--colour",)),
    # -- model folders
    Case("model-path-missing", _train_new("model.name=/nonexistent/bert"), ("/nonexistent/bert", "does not exist")),
    Case("model-no-config-json", _train_new("model.name={no_config}"), ("{no_config}", "config.json")),
    Case("model-no-tokenizer", ("predict", "{no_tokenizer}", "{d}/texts.txt"), ("{no_tokenizer}", "tokenizer")),
    Case("model-unknown-name", _train_new("model.name=minilm-l12"), ("'minilm-l12'", "minilm-l6")),
    # -- run directories
    Case("evaluate-not-a-run-dir", ("evaluate", "{not_run}"), ("{not_run}", "run directory", "config.json")),
    Case("predict-not-a-run-dir", ("predict", "{not_run}", "{d}/texts.txt"), ("{not_run}", "run directory")),
    Case("export-not-a-run-dir", ("export", "{not_run}", "{fresh}"), ("{not_run}", "not a run directory")),
    Case("evaluate-step-999", ("evaluate", "{run}", "--step", "999"), ("{run}", "999")),
    Case("export-step-999", ("export", "{run}", "{fresh}", "--step", "999"), ("{run}", "999")),
    Case("export-into-user-files", ("export", "{run}", "{user_dir}"), ("{user_dir}", "thesis.tex")),
    Case("export-onto-a-file", ("export", "{run}", "{a_file}"), ("{a_file}", "is a file")),
    Case("train-rerun-other-pooling", ("train", *TRAIN_ARGS, "model.pooling=mean"),
         ("{run}", "model.pooling", "cls_pooler -> mean")),
    Case("train-rerun-other-max-length", ("train", *TRAIN_ARGS, "data.max_length=64"),
         ("{run}", "data.max_length", "32 -> 64")),
]


@dataclass
class Outcome:
    argv: list[str]
    subs: dict[str, str]
    proc: subprocess.CompletedProcess
    changes: list[str]  # what the command added, removed or changed in its world

    def shown(self) -> str:
        p = self.proc
        return (f"$ flaxclf {' '.join(self.argv)}\nexit {p.returncode}\nstderr:\n{p.stderr}\nstdout (end):\n"
                f"{p.stdout[-2000:]}")


def _run_case(case: Case, static: Path, run_dir: Path, scratch: Path, model: Path) -> Outcome:
    world = scratch / case.id
    shutil.copytree(static, world)
    if case.needs_run:
        shutil.copytree(run_dir, world / "run")
    subs = _subs(world, model)
    argv = [a.format(**subs) for a in case.argv]
    before = tree_state(world)
    p = flaxclf(*argv)
    changes = _changes(before, tree_state(world))
    shutil.rmtree(world)
    return Outcome(argv, subs, p, changes)


@pytest.fixture(scope="session")
def outcomes(tmp_path_factory, tiny_model_dir, tiny_run) -> dict[str, Outcome]:
    """Every case, run once, two at a time; a case that names {run} gets a copy of the session's tiny run. Over 60 s,
    charged to the first case that asks: 47 commands, each a process that imports jax (and some load the run)."""
    root = tmp_path_factory.mktemp("bad-inputs")
    static, scratch = root / "world", root / "cases"
    _build_static(static, tiny_model_dir)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c.id: pool.submit(_run_case, c, static, tiny_run, scratch, tiny_model_dir) for c in CASES}
        return {k: f.result() for k, f in futures.items()}


def test_at_least_28_kinds_with_unique_ids():
    assert len({c.id for c in CASES}) == len(CASES) >= 28


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(outcomes, case):
    """The first case takes over 60 s: it waits for the `outcomes` fixture, which runs all 47 commands."""
    out = outcomes[case.id]
    assert out.proc.returncode == 2, out.shown()
    lines = out.proc.stderr.splitlines()
    assert len(lines) == 1, out.shown()
    prefix = f"flaxclf {case.command}: error: " if case.command else "flaxclf: error: "
    assert lines[0].startswith(prefix), out.shown()
    for name in case.names:
        assert name.format(**out.subs) in lines[0], f"{name.format(**out.subs)!r} is not named\n{out.shown()}"
    assert "Traceback" not in out.proc.stdout, out.shown()
    assert not out.changes, f"{out.changes}\n{out.shown()}"
