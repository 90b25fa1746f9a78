"""The `flaxclf` command: train | evaluate | predict | export | inspect."""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from flaxclf.config import ConfigError


def _train(args: argparse.Namespace) -> int:
    from flaxclf.config import load_config
    from flaxclf.train import run

    cfg = load_config(args.config, args.overrides)
    run(cfg, show_progress=not args.no_progress)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flaxclf", description="Fine-tune and use BERT text classifiers in JAX.")
    p.add_argument("--verbose", action="store_true", help="show framework logs and warnings")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    t = sub.add_parser("train", help="fine-tune a classifier (default: MiniLM-L6 on rt-snippets-4way)",
                       description="Fine-tune a classifier. With no arguments: configs/default.yaml's job.")
    t.add_argument("--config", default=None, help="a YAML run config (e.g. configs/default.yaml); "
                   "without it the defaults of flaxclf/config.py apply")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (logs still go to metrics.jsonl)")
    t.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=1 optim.learning_rate=3e-5 mesh.fsdp=2")
    t.set_defaults(fn=_train)
    return p


def _quiet(verbose: bool) -> None:
    """Known framework noise off unless --verbose: absl/orbax info lines and transformers' advisories."""
    level = logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, format="%(name)s: %(message)s")
    logging.getLogger("flaxclf").setLevel(logging.INFO)
    for name in ("absl", "orbax", "jax", "transformers"):
        logging.getLogger(name).setLevel(level if verbose else logging.ERROR)
    if not verbose:
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*Flax.*deprecat.*")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _quiet(args.verbose)
    from flaxclf.assets import AssetError
    from flaxclf.checkpoint import CheckpointError
    from flaxclf.data import DataError
    from flaxclf.weights import WeightsError

    try:
        return args.fn(args)
    except (ConfigError, DataError, AssetError, WeightsError, CheckpointError) as e:
        print(f"flaxclf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
