"""Input pipeline throughput on rt-snippets-4way with the MiniLM tokenizer: cold (empty tokenization cache),
cached, and the batch iterator alone, in examples/s, printed as plain lines.

    .venv/bin/python bench/bench_data.py [--global-batch-size 32] [--step-length 32]

Beside them, in the same run, it times flaxclf's real training step (MiniLM-L6, fp32, forward + backward +
clipping + AdamW, jitted as the job runs it) at the same global batch and the shortest bucket length (the
fastest step, so the most demanding comparison), and prints pipeline / step ratios: the goal is >= 10x.
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
                            buckets: tuple[int, ...] = tuple(DataConfig().buckets),
                            repeats: int = 3) -> dict[str, float]:
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


def step_examples_per_s(global_batch_size: int = 32, length: int = 32, steps: int = 5) -> float:
    """Median examples/s of the job's jitted train step on MiniLM-L6 at [global_batch_size, length]."""
    import jax.numpy as jnp

    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.hf import weights
    from flaxclf.models.bert import BertClassifier
    from flaxclf.models.bert.families import decays as bert_decays
    from flaxclf.options import SINGLE
    from flaxclf.runtime import sharding
    from flaxclf.training import optim
    from flaxclf.training import steps as st

    folder = assets.resolve_model("minilm-l6")
    model = BertClassifier(weights.classifier_config(folder, num_labels=4, problem_type=SINGLE))
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = optim.make_optimizer(OptimConfig(), 10_000, bert_decays)
    shardings = st.state_shardings(st.abstract_state(model, tx, jnp.float32), mesh, model)
    state = st.create_state(weights.load_params(model, folder, jax.random.PRNGKey(0)), tx, shardings, 0)
    train, _ = st.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    rng = np.random.default_rng(0)
    ids = rng.integers(1000, 30000, (global_batch_size, length)).astype(np.int32)
    batch = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
             "labels": rng.integers(0, 4, global_batch_size).astype(np.int32),
             "weight": np.ones(global_batch_size, np.float32)}
    batch = jax.device_put(batch, sharding.batch_sharding(mesh))
    state, m = train(state, batch)  # compile
    jax.block_until_ready(m)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, m = train(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - start)
    return global_batch_size / float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--step-length", type=int, default=32, help="padded length of the timed train step")
    args = parser.parse_args()
    r = pipeline_examples_per_s(args.global_batch_size, args.max_length, repeats=args.repeats)
    print(f"rt-snippets-4way train: {int(r['train_rows'])} rows, {int(r['rows_per_epoch'])} per epoch at global "
          f"batch {args.global_batch_size}, max_length {args.max_length}, {jax.devices()[0].platform}")
    print(f"pipeline cold (read + tokenize + batch + place): {r['cold']:.0f} examples/s")
    print(f"pipeline cached (read + cache hit + batch + place): {r['cached']:.0f} examples/s")
    print(f"batch iterator alone (batch + place): {r['iterator']:.0f} examples/s")
    step = step_examples_per_s(args.global_batch_size, args.step_length)
    print(f"train step (MiniLM-L6, fp32, {args.global_batch_size} x {args.step_length}): {step:.1f} examples/s")
    for name in ("cold", "cached", "iterator"):
        print(f"pipeline {name} / train step: {r[name] / step:.0f}x (goal >= 10x)")


if __name__ == "__main__":
    main()
