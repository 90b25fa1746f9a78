"""The main job's packed train step at several row lengths, side by side in one process.

A packed step's attention spans each token's whole row (masked to its own text), so its work per token grows with
the row's length; the texts decide how short a row can be (the longest must fit). This measures what the row length
costs: the same `--texts` texts (lengths drawn from the main job's training split, rt-snippets-4way tokenized by
MiniLM-L6 at max_length 128, seed 0) packed best-fit decreasing into rows of each length, the job's jitted train step
(flaxclf.training.steps.compile_steps on one device: dropout, forward, backward, clipping 1.0, masked AdamW) on
MiniLM-L6's shape with random weights, fp32. Each length compiles its own executable; then `--rounds` rounds call
each once in turn (interleaved, so that the machine's drift falls on every length alike). Prints each length's rows,
compile time, median step and its ratio to the first length's.

    .venv/bin/python bench/packed_rows.py                       # rows of 128 (max_length), 80 (fitted), 64, 96
    .venv/bin/python bench/packed_rows.py --lengths 128,80 --rounds 15
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np


def main_job_lengths() -> np.ndarray:
    from flaxclf import assets
    from flaxclf.config import DataConfig
    from flaxclf.data import load_task

    _, splits = load_task(DataConfig(), assets.resolve_model("minilm-l6"), 0, 1)
    return splits["train"].lengths


def packed_batch(lengths: np.ndarray, row: int, vocab: int, num_labels: int) -> dict:
    """The texts (random ids of the given lengths, random labels) as one packed batch of rows of `row` tokens."""
    from flaxclf.data.packing import pack

    rng = np.random.default_rng(0)
    rows = pack(lengths, row)
    slots = max(map(len, rows))
    ids, seg = np.zeros((len(rows), row), np.int32), np.zeros((len(rows), row), np.int32)
    labels, weight = np.zeros((len(rows), slots), np.int32), np.zeros((len(rows), slots), np.float32)
    for r, members in enumerate(rows):
        at = 0
        for s, i in enumerate(members):
            n = int(lengths[i])
            ids[r, at:at + n] = rng.integers(5, vocab, n)
            seg[r, at:at + n] = s + 1
            labels[r, s], weight[r, s] = rng.integers(0, num_labels), 1.0
            at += n
    return {"input_ids": ids, "attention_mask": seg, "token_type_ids": np.zeros_like(ids), "labels": labels,
            "weight": weight}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", default="128,80,64,96", help="row lengths, comma separated; ratios to the first")
    p.add_argument("--texts", type=int, default=32, help="texts in the batch (the main job's batch size)")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()

    from flaxclf.runtime import hostmem

    hostmem.keep_freed_memory()  # first, as the flaxclf command does (bench/step_timing.py says why)
    import jax
    import jax.numpy as jnp

    from flaxclf import assets
    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.hf import config as hf_config
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.registry import encoder_of
    from flaxclf.options import SINGLE
    from flaxclf.runtime import sharding
    from flaxclf.training import steps
    from flaxclf.training.optim import make_optimizer

    hf = hf_config.read_hf_config(assets.resolve_model("minilm-l6"))
    config = ClassifierConfig.from_hf({**hf, "num_labels": 4}).replace(problem_type=SINGLE)
    model = make_classifier(config)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0), 10_000,
                        encoder_of(config.backbone).decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    state = steps.create_state(jax.device_get(init_params(model, jax.random.PRNGKey(0))), tx, shardings, 0)
    texts = np.random.default_rng(0).choice(main_job_lengths(), a.texts)
    lengths = [int(x) for x in a.lengths.split(",")]
    calls, info, temps = {}, {}, []
    for row in lengths:
        b = packed_batch(texts, row, config.backbone.vocab_size, 4)
        placed = jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, sharding.batch_sharding(mesh))
        start = time.perf_counter()
        exe = train.lower(state, placed).compile()
        temps.append(exe.memory_analysis().temp_size_in_bytes)
        calls[row] = (exe, placed)
        info[row] = {"rows": b["input_ids"].shape[0], "tokens": int(b["input_ids"].size),
                     "compile_s": round(time.perf_counter() - start, 2)}
    hostmem.cap_heap_at_working_set(max(temps))
    times: dict[int, list[float]] = {row: [] for row in lengths}
    for r in range(a.rounds + 1):  # round 0 warms up
        for row in lengths:
            exe, placed = calls[row]
            start = time.perf_counter()
            state, m = exe(state, placed)
            jax.block_until_ready(m["loss"])
            if r:
                times[row].append(time.perf_counter() - start)
    base = float(np.median(times[lengths[0]]))
    for row in lengths:
        med = float(np.median(times[row]))
        print(json.dumps({"row_length": row, **info[row], "step_s": round(med, 4),
                          "time_vs_first": round(med / base, 3)}), flush=True)


if __name__ == "__main__":
    main()
