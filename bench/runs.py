"""The real `flaxclf train` command as the data benchmarks run it: one subprocess per run, its summary back."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rt_tables() -> dict:
    """The packaged rt-snippets-4way splits as readers.Table objects (texts and 4-way labels)."""
    from flaxclf import assets
    from flaxclf.data import readers

    return readers.read_rt_snippets(assets.resolve_task("rt-snippets-4way"), lambda _: None)


def train(run_dir: Path, files: dict[str, Path], overrides: list[str]) -> dict:
    """Trains on the CSV files into run_dir (started afresh); returns summary.json plus stdout and wall_s."""
    cmd = [sys.executable, "-m", "flaxclf.cli", "train", "--no-progress", "data.task=null",
           *(f"data.{split}_file={path}" for split, path in files.items()), f"train.output_dir={run_dir}",
           "checkpoint.fresh=true", *overrides]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"{run_dir.name}: exit {proc.returncode}\n{proc.stderr[-3000:]}")
    return {**json.loads((run_dir / "summary.json").read_text()), "stdout": proc.stdout, "wall_s": wall}


def parser(doc: str, out: str, train_rows: int) -> argparse.ArgumentParser:
    """The arguments every data benchmark takes: where to write, the split sizes, the seed, train overrides."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path(out))
    p.add_argument("--train", type=int, default=train_rows, help="training rows (documents)")
    p.add_argument("--validation", type=int, default=200)
    p.add_argument("--test", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="train overrides for every run, e.g. train.epochs=2")
    return p


def sizes(args: argparse.Namespace) -> dict[str, int]:
    args.out.mkdir(parents=True, exist_ok=True)
    return {"train": args.train, "validation": args.validation, "test": args.test}
