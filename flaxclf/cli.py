"""The `flaxclf` command: train | evaluate | predict | export | inspect."""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import logging
import sys
import traceback
import warnings
from pathlib import Path

from flaxclf.config import ConfigError
from flaxclf.options import CHUNK_AGGREGATIONS, FILE_FORMATS, INPUT_FORMATS, LONG_TEXTS, POOLINGS
from flaxclf.runtime.hostmem import keep_freed_memory

DEFAULT_TEXT = "a gripping, funny and moving film"
_MODEL_HELP = ("a run directory (made by `flaxclf train`), a Hugging Face model folder, a peft LoRA adapter folder "
               "(on its base_model_name_or_path), or a packaged model name (minilm-l6)")


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr ("flaxclf CMD: error: ...") and exit code 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _step(text: str) -> str | int | None:
    if text in ("last", "latest"):
        return None
    if text == "best":
        return "best"
    if text.isdigit():
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r} is not a step number, 'best' or 'last'")


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text} is not a count of tokens (>= 0)")
    return int(text)


def _write_json(obj: dict, dest: str) -> None:
    text = json.dumps(obj, indent=2) + "\n"
    if dest == "-":
        sys.stdout.write(text)
    else:
        Path(dest).expanduser().parent.mkdir(parents=True, exist_ok=True)
        Path(dest).expanduser().write_text(text)


# ---------------------------------------------------------------------------------------------- train


def _train(args: argparse.Namespace) -> int:
    from flaxclf.config import load_config
    from flaxclf.runtime import timing
    from flaxclf.training.loop import run

    cfg = load_config(args.config, args.overrides)
    run(cfg, show_progress=not args.no_progress, clock=timing.Clock(since_process_start=True))
    return 0


# ---------------------------------------------------------------------------------------------- evaluate


def _evaluate(args: argparse.Namespace) -> int:
    from flaxclf import data
    from flaxclf.inference import predict
    from flaxclf.training import metrics

    loaded = predict.load(args.model, step=args.step, max_length=args.max_length)
    loaded.read_long_text(args.long_text, args.stride, args.head_tokens, args.chunk_aggregation)
    for note in loaded.notes:
        print(f"flaxclf evaluate: note: {note}", file=sys.stderr)
    cfg = predict.eval_data_config(loaded, args.data, format=args.format, text_column=args.text_column,
                                   text_pair_column=args.text_pair_column, label_column=args.label_column,
                                   label_type=args.label_type)
    with contextlib.redirect_stdout(sys.stderr):  # data notices must not mix with a table or JSON on stdout
        task, splits = data.load_task(cfg, loaded.model_dir, 0, 1)
    split = "train" if args.data else args.split
    if split not in splits:
        raise predict.InferenceError(f"the data has no {split!r} split (it has {', '.join(splits)}); pass --split "
                                     "or --data FILE")
    where = args.data or (f"data.task {cfg.task}" if cfg.train_file is None else f"data.{split}_file")
    labels = predict.align_labels(splits[split].text_labels(), task.label_names, loaded, where)
    z = predict.logits(loaded, splits[split], args.batch_size, progress=not args.no_progress and
                       len(splits[split]) > 8 * args.batch_size)
    result = metrics.compute_metrics(loaded.problem_type, z, labels, None, loaded.label_names)
    if warning := metrics.learns_nothing(result, loaded.label_names):
        print(f"flaxclf evaluate: warning: {warning}", file=sys.stderr)
    if args.json != "-":
        print(f"{loaded.source} on {where} ({split if not args.data else 'file'}, {len(z)} examples)")
        print(metrics.format_table(result))
    if args.json:
        _write_json({"model": loaded.source, "data": where, "split": split, **result}, args.json)
    return 0


# ---------------------------------------------------------------------------------------------- predict


def _write_predictions(rows: list[dict], out, fmt: str, pairs: list[str] | None) -> None:
    if pairs is not None:
        rows = [{"text": r["text"], "text_pair": p, **{k: v for k, v in r.items() if k != "text"}}
                for r, p in zip(rows, pairs, strict=True)]
    if fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(r, ensure_ascii=False) + "\n")
        return
    flat = []
    for r in rows:
        row = {k: (";".join(v) if isinstance(v, list) else v) for k, v in r.items() if k != "probs"}
        row.update({f"prob_{name}": p for name, p in r.get("probs", {}).items()})
        flat.append(row)
    if flat:
        w = csv.DictWriter(out, fieldnames=list(flat[0]), lineterminator="\n")
        w.writeheader()
        w.writerows(flat)


def _predict(args: argparse.Namespace) -> int:
    from flaxclf.data import read_texts
    from flaxclf.inference import predict

    texts, pairs = read_texts(args.input, args.input_format, args.text_column, args.text_pair_column)
    loaded = predict.load(args.model, step=args.step, max_length=args.max_length)
    loaded.read_long_text(args.long_text, args.stride, args.head_tokens, args.chunk_aggregation)
    for note in loaded.notes:
        print(f"flaxclf predict: note: {note}", file=sys.stderr)
    split = predict.tokenize(loaded, texts, pairs)
    z = predict.logits(loaded, split, args.batch_size, progress=not args.no_progress and
                       len(texts) > 4 * args.batch_size)
    rows = predict.prediction_rows(loaded, texts, z, args.threshold)
    fmt = args.format or ("jsonl" if args.output and Path(args.output).suffix in (".jsonl", ".json") else "csv")
    if args.output in (None, "-"):
        _write_predictions(rows, sys.stdout, fmt, pairs)
    else:
        Path(args.output).expanduser().parent.mkdir(parents=True, exist_ok=True)
        with Path(args.output).expanduser().open("w", newline="", encoding="utf-8") as f:
            _write_predictions(rows, f, fmt, pairs)
        print(f"wrote {len(rows)} predictions to {args.output}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------- export


def _export(args: argparse.Namespace) -> int:
    from flaxclf.hf import weights
    from flaxclf.inference import predict, runs
    from flaxclf.training import checkpoint

    if not predict.is_run_dir(args.run_dir):
        raise predict.InferenceError(f"{args.run_dir} is not a run directory (config.yaml and checkpoints/); "
                                     "pass the train.output_dir of a `flaxclf train` run")
    if (Path(args.run_dir).expanduser() / checkpoint.CHECKPOINTS).is_dir():
        out, step = runs.export_checkpoint(args.run_dir, args.out_dir, step=args.step, adapter=args.adapter)
        which = f"checkpoint {step}" + (" (the best)" if args.step == "best" else "")
    elif args.adapter:
        raise predict.InferenceError(f"{args.run_dir} has no checkpoints/ to take the adapter from; its adapter/ "
                                     "folder, where it trained with LoRA, is peft's already")
    else:  # a run directory that kept only its export/
        loaded = predict.load(args.run_dir, step=args.step)
        out = weights.export_hf(args.out_dir, loaded.model.config, loaded.params, loaded.model_dir)
        which = loaded.source
    if args.adapter:
        print(f"exported {which}'s LoRA adapter to {out}\n  PyTorch: PeftModel.from_pretrained("
              f"AutoModelForSequenceClassification.from_pretrained(<its base_model_name_or_path>, num_labels=...), "
              f"{str(out)!r})")
        return 0
    print(f"exported {which} to {out}\n  PyTorch: AutoModelForSequenceClassification.from_pretrained({str(out)!r})")
    return 0


# ---------------------------------------------------------------------------------------------- inspect


def _inspect(args: argparse.Namespace) -> int:
    from flaxclf.inference import influence as inspect
    from flaxclf.inference import predict

    loaded = predict.load(args.model, step=args.step, pooling=args.pooling, num_labels=args.num_labels,
                          max_length=args.max_length)
    inf = inspect.measure(loaded, args.text, args.pair, args.pad_to, args.scale, args.seed)
    if args.json != "-":
        print(inspect.architecture(loaded, len(inf.tokens)))
        print(f"\nwhat feeds the classifier, for {args.text!r}:\neach position's final hidden state h_i alone is "
              f"moved by a random vector of norm {args.scale:g}*|h_i|; logit change = the largest change of a "
              "logit\n")
        print(inspect.influence_table(inf))
        print("\n" + inspect.verdict(inspect.pooling_name(loaded.model.config), inf))
    if args.json:
        pooling = inspect.pooling_name(loaded.model.config)
        _write_json({"model": loaded.source, "pooling": loaded.model.config.pooling, "text": args.text,
                     **inf.to_dict(), "verdict": inspect.verdict(pooling, inf)}, args.json)
    return 0


# ---------------------------------------------------------------------------------------------- parser


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (default: the run's own data settings, else the packaged task)")
    g.add_argument("--data", metavar="FILE", help="a labelled CSV, TSV, JSONL, Parquet or datasets folder, read like "
                   "a training file")
    g.add_argument("--format", choices=FILE_FORMATS,
                   help="format of --data (default: from its extension)")
    g.add_argument("--text-column", help="column of the texts (default: text)")
    g.add_argument("--text-pair-column", help="column of the second texts, for sentence pairs")
    g.add_argument("--label-column", help="column of the labels (default: label)")
    g.add_argument("--label-type", choices=["auto", "string", "int", "float", "multi"],
                   help="how to read the labels (default: auto)")
    g.add_argument("--split", default="test", choices=["train", "validation", "test"],
                   help="split of the run's data or the packaged task to score, without --data (default: test)")


def _add_model_args(p: argparse.ArgumentParser, what: str = _MODEL_HELP) -> None:
    p.add_argument("model", metavar="MODEL", help=what)
    p.add_argument("--step", type=_step, default=None,
                   help="with a run directory: a checkpoint step, 'best' or 'last' (default: last)")
    p.add_argument("--max-length", type=int, default=None,
                   help="tokens per row (default: the run's data.max_length, else 128)")


def _add_long_text_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("texts longer than --max-length (default: the run's data.long_text settings, else "
                             "truncate)")
    g.add_argument("--long-text", choices=LONG_TEXTS, help="truncate: keep the first tokens; head_tail: the first "
                   "and last; chunks: read every token in overlapping windows, one prediction per text")
    g.add_argument("--stride", type=_count, help="chunks: tokens each window shares with the one before")
    g.add_argument("--head-tokens", type=_count, help="head_tail: tokens kept from the start (default: a quarter)")
    g.add_argument("--chunk-aggregation", choices=CHUNK_AGGREGATIONS,
                   help="chunks: mean_logits (average the windows' logits) or max_prob (each class's highest "
                   "probability over the windows)")


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show framework logs and warnings (JAX, orbax, transformers)")
    p = _Parser(prog="flaxclf", parents=[common], description="Fine-tune and use BERT text classifiers in JAX.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", parents=[common],
                       help="fine-tune a classifier (default: MiniLM-L6 on rt-snippets-4way)",
                       description="Fine-tune a classifier. Settings come from flaxclf/config.py's defaults, then "
                       "--config, then key=value overrides. Writes the run directory (train.output_dir): "
                       "config.yaml, labels.json, metrics.jsonl, tb/, checkpoints/, export/, plots/, summary.json. "
                       "Running it "
                       "again on the same directory resumes from the last checkpoint.")
    t.add_argument("--config", default=None, help="a YAML run config (e.g. configs/default.yaml); "
                   "without it the defaults of flaxclf/config.py apply")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=1 optim.learning_rate=3e-5 mesh.fsdp=2")
    t.set_defaults(fn=_train)

    e = sub.add_parser("evaluate", parents=[common], help="score a model on labelled data: a metrics table or JSON",
                       description="Score a checkpoint or an HF folder on labelled data; prints a metrics table "
                       "(accuracy, F1, per-class scores, confusion matrix) and optionally writes JSON.")
    _add_model_args(e)
    _add_data_args(e)
    _add_long_text_args(e)
    e.add_argument("--batch-size", type=int, default=64, help="texts per batch (default: 64)")
    e.add_argument("--json", metavar="FILE", help="also write the metrics as JSON to FILE; '-' prints only the JSON "
                   "on stdout")
    e.add_argument("--no-progress", action="store_true", help="no progress bar on long inputs")
    e.set_defaults(fn=_evaluate)

    r = sub.add_parser("predict", parents=[common], help="label texts from a file or stdin: CSV or JSONL out",
                       description="Label texts: one a line, or a CSV/TSV/JSONL column, from a file or stdin. "
                       "Writes the text, the label and every class's probability (sigmoid for multi-label, the "
                       "score for regression) as CSV or JSONL. Texts are batched by length like evaluation.")
    _add_model_args(r)
    r.add_argument("input", nargs="?", default="-", metavar="INPUT",
                   help="input file; '-' or none reads stdin (as lines: one text a line, blank lines skipped)")
    r.add_argument("--input-format", choices=INPUT_FORMATS,
                   help="how to read INPUT (default: from its extension; lines otherwise, and for stdin)")
    r.add_argument("--text-column", default="text", help="column of the texts in CSV/TSV/JSONL (default: text)")
    r.add_argument("--text-pair-column", default=None, help="column of the second texts, for sentence pairs")
    r.add_argument("-o", "--output", default=None, help="output file (default: stdout)")
    r.add_argument("--format", choices=["csv", "jsonl"], default=None,
                   help="output format (default: from --output's extension, else csv)")
    r.add_argument("--batch-size", type=int, default=64, help="texts per batch (default: 64)")
    r.add_argument("--threshold", type=float, default=0.5, help="multi-label: probability above which a label is "
                   "predicted (default: 0.5)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar on long inputs")
    _add_long_text_args(r)
    r.set_defaults(fn=_predict)

    x = sub.add_parser("export", parents=[common], help="write a checkpoint as a Hugging Face (PyTorch) folder",
                       description="Write a run's checkpoint as a folder that transformers' "
                       "AutoModelForSequenceClassification.from_pretrained loads as the family's "
                       "*ForSequenceClassification (config.json, model.safetensors, tokenizer files). Needs "
                       "pooling=cls_pooler, the only head PyTorch has.")
    x.add_argument("run_dir", metavar="RUN_DIR", help="a run directory made by `flaxclf train`")
    x.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write: a new or empty one, or an earlier "
                   "flaxclf export (replaced); a folder with other files is refused")
    x.add_argument("--step", type=_step, default=None, help="a checkpoint step, 'best' or 'last' (default: last)")
    x.add_argument("--adapter", action="store_true", help="a LoRA run (model.lora): write its adapter as peft's "
                   "folder (adapter_config.json, adapter_model.safetensors) for PeftModel.from_pretrained, instead "
                   "of the model with the adapter merged into its weights")
    x.set_defaults(fn=_export)

    i = sub.add_parser("inspect", parents=[common], help="draw the head and measure which positions feed it",
                       description="Draw the classifier head (backbone -> positions -> pooler -> dropout -> "
                       "classifier, with shapes and parameter counts) and measure, for one text, how far the "
                       "logits move when each position's final hidden state is perturbed: does it classify on "
                       "the [CLS] vector?")
    _add_model_args(i)
    i.add_argument("--text", default=DEFAULT_TEXT, help=f"the text to measure (default: {DEFAULT_TEXT!r})")
    i.add_argument("--pair", default=None, help="a second text, for sentence-pair models")
    i.add_argument("--pooling", choices=POOLINGS, default=None,
                   help="HF folder or packaged name only: the head to build (default: cls_pooler)")
    i.add_argument("--num-labels", type=int, default=None, help="HF folder or packaged name only: classes of a new "
                   "head (default: the folder's config.json)")
    i.add_argument("--pad-to", type=int, default=None, help="pad the text to this length (default: the smallest "
                   "length bucket that holds it, as in training; 0: no padding)")
    i.add_argument("--scale", type=float, default=1.0, help="perturbation norm relative to |h_i| (default: 1.0)")
    i.add_argument("--seed", type=int, default=0, help="seed of the perturbation directions (default: 0)")
    i.add_argument("--json", metavar="FILE", help="also write the measurements as JSON; '-' prints only the JSON")
    i.set_defaults(fn=_inspect)
    p.commands = sub.choices  # name -> the command's own parser (_parse hands it the command's arguments)
    return p


def _quiet(verbose: bool) -> None:
    """Known framework noise off unless --verbose: absl/orbax info lines and transformers' advisories (its Flax
    deprecation notice is known: Flax BERT was removed in transformers v5, hence model.impl=hf needs 4.x)."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    logging.getLogger("flaxclf").setLevel(logging.INFO)
    for name in ("absl", "orbax", "jax", "transformers"):
        logging.getLogger(name).setLevel(level if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Flax.*deprecat.*")


def _user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions that mean a user's input or setting is wrong (each module defines its own)."""
    from flaxclf.assets import AssetError
    from flaxclf.data import DataError
    from flaxclf.hf.weights import WeightsError
    from flaxclf.inference.predict import InferenceError
    from flaxclf.runtime.outputs import OutputError
    from flaxclf.training.checkpoint import CheckpointError
    from flaxclf.training.loop import TrainingError

    return (ConfigError, DataError, AssetError, WeightsError, CheckpointError, InferenceError, TrainingError,
            OutputError)


def _parse(argv: list[str]) -> argparse.Namespace:
    """The command's own parser reads everything after it, options and positionals in any order (argparse alone
    stops taking positionals at the first option: `predict RUN --no-progress FILE` would lose FILE), and names
    the command in its errors."""
    parser = _parser()
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), None)
    commands = parser.commands
    if at is None or argv[at] not in commands:
        return parser.parse_args(argv)  # help, or the error naming the commands
    args = commands[argv[at]].parse_intermixed_args(argv[:at] + argv[at + 1:])
    args.command = argv[at]
    return args


# The commands that compile a forward step: they read and fill the compilation cache as `flaxclf train` does.
_COMPILING = ("evaluate", "predict", "inspect")


@contextlib.contextmanager
def _compilation(args: argparse.Namespace):
    """JAX's persistent compilation cache for a command that compiles, so that the second evaluate or predict of a
    run compiles nothing: a run directory's own train.compilation_cache settings, else flaxclf's cache folder.
    With --verbose, says on stderr how many executables the command used and how many came from the cache."""
    from flaxclf.config import TrainConfig
    from flaxclf.inference import predict
    from flaxclf.runtime import compilation, timing

    train_cfg = TrainConfig()  # flaxclf's cache folder, for an HF folder or a packaged name
    if predict.is_run_dir(args.model):
        with contextlib.suppress(Exception):  # an unreadable config.yaml is the command's own error to report
            train_cfg = predict.run_config(Path(args.model).expanduser()).train
    compilation.enable_configured_cache(train_cfg)
    timing.listen()
    before = timing.compile_totals()
    yield
    if getattr(args, "verbose", False):
        after = timing.compile_totals()
        print(f"flaxclf {args.command}: compilation: {after['compiles'] - before['compiles']} executables, "
              f"{after['cache_hits'] - before['cache_hits']} read from the compilation cache", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Runs one command. A user error is one line on stderr and exit code 2 (--verbose adds its traceback); a
    traceback without --verbose means a bug in flaxclf."""
    args = _parse(sys.argv[1:] if argv is None else list(argv))
    verbose = getattr(args, "verbose", False)
    _quiet(verbose)
    try:
        with _compilation(args) if args.command in _COMPILING else contextlib.nullcontext():
            return args.fn(args)
    except _user_errors() as e:
        err, message = e, " ".join(str(e).split())
    except OSError as e:  # the machine's answer, not flaxclf's bug: a full disk, a missing permission
        if e.filename is None:
            raise
        err, message = e, f"{e.filename}: {e.strerror}; free some space, fix the permissions or choose another path"
    except KeyboardInterrupt:
        print(f"flaxclf {args.command}: interrupted", file=sys.stderr)
        return 130
    if verbose:
        traceback.print_exception(err)
    print(f"flaxclf {args.command}: error: {message}", file=sys.stderr)
    return 2


def console(argv: list[str] | None = None) -> int:
    """The `flaxclf` command and train.py: main() in a process whose malloc keeps what XLA frees, so that steps
    after the first page-fault nothing (flaxclf.runtime.hostmem; set FLAXCLF_KEEP_FREED_MEMORY=0 to leave it as it is).
    Called before any computation, as it must be; main() alone (tests, embedding) leaves malloc alone."""
    keep_freed_memory()
    return main(argv)


if __name__ == "__main__":
    sys.exit(console())
