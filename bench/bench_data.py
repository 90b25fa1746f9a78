"""Input pipeline throughput on rt-snippets-4way with the MiniLM tokenizer: cold (empty tokenization cache),
cached, and the batch iterator alone, in examples/s, printed as plain lines.

    .venv/bin/python bench/bench_data.py [--global-batch-size 32] [--step-examples-per-s 11.3]

`pipeline_examples_per_s()` returns the numbers, so a later script can print them beside the training step's
examples/s; with --step-examples-per-s this script prints the ratio itself (above 1: the host keeps up).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from flaxclf import assets, data
from flaxclf.config import DataConfig


def _one_epoch(split: data.TokenizedSplit, cfg: DataConfig, global_batch_size: int, sharding) -> tuple[int, float]:
    """Rows delivered and seconds for one epoch of placed training batches (waiting for the copies)."""
    it = data.TrainBatches(split, global_batch_size, cfg.buckets, seed=0, sharding=sharding,
                           prefetch=cfg.prefetch, num_epochs=1)
    start = time.perf_counter()
    rows = 0
    for batch in it:
        jax.block_until_ready(batch["input_ids"])
        rows += batch["input_ids"].shape[0]
    return rows, time.perf_counter() - start


def pipeline_examples_per_s(global_batch_size: int = 32, max_length: int = 128,
                            buckets: tuple[int, ...] = (32, 64, 128), repeats: int = 3) -> dict[str, float]:
    """Training examples/s of the input pipeline, best of `repeats`:
    cold = (load with an empty cache + one epoch) ; cached = (load from the cache + one epoch) ;
    iterator = one epoch of batches from tokenized data (what the train step competes with)."""
    model_dir = assets.resolve_model("minilm-l6")
    assets.resolve_task("rt-snippets-4way")  # the one-time download is not part of the pipeline
    sharding = NamedSharding(jax.make_mesh((1, 1), ("data", "fsdp")), PartitionSpec(("data", "fsdp")))
    cold, cached, iterator = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            cfg = DataConfig(max_length=max_length, buckets=list(buckets), cache_dir=cache)
            for times, hit in ((cold, False), (cached, True)):
                start = time.perf_counter()
                _, splits = data.load_task(cfg, model_dir)
                load_s = time.perf_counter() - start
                assert splits["train"].from_cache is hit
                rows, epoch_s = _one_epoch(splits["train"], cfg, global_batch_size, sharding)
                times.append(rows / (load_s + epoch_s))
                if hit:
                    iterator.append(rows / epoch_s)
    return {"cold": max(cold), "cached": max(cached), "iterator": max(iterator),
            "train_rows": float(len(splits["train"])), "rows_per_epoch": float(rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-examples-per-s", type=float, default=None,
                        help="the training step's examples/s, to print the ratio pipeline / step")
    args = parser.parse_args()
    r = pipeline_examples_per_s(args.global_batch_size, args.max_length, repeats=args.repeats)
    print(f"rt-snippets-4way train: {int(r['train_rows'])} rows, {int(r['rows_per_epoch'])} per epoch at global "
          f"batch {args.global_batch_size}, max_length {args.max_length}, {jax.devices()[0].platform}")
    print(f"pipeline cold (read + tokenize + batch + place): {r['cold']:.0f} examples/s")
    print(f"pipeline cached (read + cache hit + batch + place): {r['cached']:.0f} examples/s")
    print(f"batch iterator alone (batch + place): {r['iterator']:.0f} examples/s")
    if args.step_examples_per_s:
        ratio = np.float64(r["iterator"]) / args.step_examples_per_s
        print(f"iterator / train step ({args.step_examples_per_s:g} examples/s): {ratio:.1f}x")


if __name__ == "__main__":
    main()
