"""How many times the training loop's jitted step compiles over one real epoch, and how long each compile takes.

A real epoch: rt-snippets-4way tokenized by MiniLM's tokenizer, data.buckets at the default
([16, 24, 32, 40, 48, 64, 128], max_length 128), global batch 32, flaxclf.data.TrainBatches on a 1-device mesh,
the step from flaxclf.training.steps.compile_steps. The count comes from two independent sources that must agree: jax's
backend-compile events (jax.monitoring, each with its duration) and the jitted step's own cache size. The goal:
compilations == the number of distinct bucket lengths the epoch used.

    .venv/bin/python bench/compile_count.py                   # a tiny random BERT (fast; same shapes per bucket)
    .venv/bin/python bench/compile_count.py --model minilm-l6 # the real model (slow on a busy CPU)

The model size changes the compile times, not the count: the shapes that reach the step are the batch shapes.
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import jax
import jax.numpy as jnp
from jax._src.dispatch import BACKEND_COMPILE_EVENT

from flaxclf import assets, data
from flaxclf.config import DataConfig, MeshConfig, OptimConfig
from flaxclf.hf.weights import from_pretrained
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import decays as bert_decays
from flaxclf.models.classifier import ClassifierConfig, init_params
from flaxclf.options import SINGLE
from flaxclf.runtime import sharding
from flaxclf.training import steps
from flaxclf.training.optim import make_optimizer

_compiles: list[tuple[str, float]] = []


def _listener(event: str, duration: float, **kw) -> None:
    if event == BACKEND_COMPILE_EVENT:
        _compiles.append((str(kw.get("fun_name", "?")), duration))


def _model(name: str, num_labels: int, vocab: int) -> tuple[BertClassifier, dict]:
    if name == "tiny":
        spec = BertSpec(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64)
        model = BertClassifier(ClassifierConfig(backbone=spec, num_labels=num_labels, problem_type=SINGLE))
        return model, init_params(model, jax.random.PRNGKey(0))
    return from_pretrained(name, num_labels=num_labels, problem_type=SINGLE)


def count_epoch(model_name: str = "tiny", buckets: tuple[int, ...] = tuple(DataConfig().buckets),
                max_length: int = 128, global_batch: int = 32, max_steps: int | None = None) -> dict:
    """Runs one epoch (or max_steps) and returns the counts, the bucket lengths used and the compile times."""
    jax.monitoring.register_event_duration_secs_listener(_listener)
    model_dir = assets.resolve_model("minilm-l6")
    cfg = DataConfig(max_length=max_length, buckets=list(buckets))
    task, splits = data.load_task(cfg, model_dir, process_index=0, process_count=1)
    model, params = _model(model_name, task.num_labels, 30522)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    batches = data.TrainBatches(splits["train"], global_batch, cfg.buckets, seed=0,
                                sharding=sharding.batch_sharding(mesh), num_epochs=1)
    total = batches.steps_per_epoch if max_steps is None else min(max_steps, batches.steps_per_epoch)
    tx = make_optimizer(OptimConfig(), total, bert_decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    state = steps.create_state(jax.device_get(params), tx, shardings, seed=0)
    del _compiles[:]
    lengths: collections.Counter = collections.Counter()
    first_call_s: dict[int, float] = {}
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        if i >= total:
            break
        length = int(batch["input_ids"].shape[1])
        t = time.perf_counter()
        state, m = train(state, batch)
        if length not in lengths:  # the first step of a new length pays for the compile
            jax.block_until_ready(m["loss"])
            first_call_s[length] = round(time.perf_counter() - t, 2)
        lengths[length] += 1
    jax.block_until_ready(state.step)
    step_compiles = [(n, d) for n, d in _compiles if "train_step" in n]
    return {"model": model_name, "steps": sum(lengths.values()), "epoch_s": round(time.perf_counter() - start, 1),
            "bucket_lengths_configured": list(batches.bucket_lengths),
            "steps_per_length": dict(sorted(lengths.items())), "lengths_used": len(lengths),
            "compiles_train_step_events": len(step_compiles), "jit_cache_size": train._cache_size(),
            "compile_s": [round(d, 2) for _, d in step_compiles], "first_call_s": first_call_s,
            "all_compile_events_in_epoch": len(_compiles),
            "ok": len(step_compiles) == len(lengths) == train._cache_size()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny (random 2-layer, width 32) or a packaged model name")
    p.add_argument("--max-steps", type=int, default=None, help="stop early (default: the whole epoch)")
    a = p.parse_args()
    print(json.dumps(count_epoch(a.model, max_steps=a.max_steps)))


if __name__ == "__main__":
    main()
