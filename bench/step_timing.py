"""What the step benchmarks against torch share (bench/modernbert_vs_torch.py, bench/deberta_vs_torch.py): a
classifier's jitted train or eval step as the `flaxclf` command runs it, torch's train step or inference, the
timing of a call, and one process per measurement with its peak RSS."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def batch(rows: int, length: int, vocab: int, num_labels: int) -> dict:
    """Random tokens, every one real, and random labels (numpy)."""
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, num_labels, rows).astype(np.int32), "weight": np.ones(rows, np.float32)}


def flaxclf_call(model, what: str, b: dict, decays: Callable[[str], bool]) -> tuple[Callable[[], None], int]:
    """The job's jitted train step (flaxclf.training.steps.compile_steps on one device: dropout, forward, backward,
    clipping 1.0, masked AdamW) or eval step on `b`, with the heap capped as the flaxclf command caps it (and,
    under timed(), freed memory kept); returns a call and the step's XLA temporaries in bytes."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.models.classifier import init_params
    from flaxclf.options import SINGLE
    from flaxclf.runtime import hostmem, sharding
    from flaxclf.training import steps
    from flaxclf.training.optim import make_optimizer

    params = jax.device_get(init_params(model, jax.random.PRNGKey(0)))
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0), 10_000, decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, evaluate = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    placed_batch = jax.device_put({k: jnp.asarray(v) for k, v in b.items()}, sharding.batch_sharding(mesh))
    if what == "train":
        holder = {"state": steps.create_state(params, tx, shardings, 0, model.config.lora)}
        del params
        temp = train.lower(holder["state"], placed_batch).compile().memory_analysis().temp_size_in_bytes

        def call():
            holder["state"], m = train(holder["state"], placed_batch)
            jax.block_until_ready(m["loss"])
    else:
        placed = steps.place(params, shardings.params)
        del params
        temp = evaluate.lower(placed, placed_batch).compile().memory_analysis().temp_size_in_bytes

        def call():
            np.asarray(evaluate(placed, placed_batch))
    # As the flaxclf command caps it by default; the cap's thread runs until the process ends.
    hostmem.cap_heap_at_working_set(temp)
    return call, temp


def torch_call(build: Callable[[], object], what: str, b: dict, no_decay: Callable[[str], bool]):
    """The model build() makes (seed 0) and its train step (AdamW lr 5e-5, weight decay 0.01 but where
    no_decay(name), clip_grad_norm_(1.0)) or inference under torch.inference_mode() on `b`'s input_ids,
    attention_mask (and labels); returns (model, call). Under timed(), freed memory is kept as the flaxclf command
    keeps it."""
    import torch

    torch.manual_seed(0)
    model = build()
    tb = {k: torch.tensor(v).long() for k, v in b.items() if k in ("input_ids", "attention_mask", "labels")}
    if what == "train":
        model.train()
        named = list(model.named_parameters())
        opt = torch.optim.AdamW([{"params": [p for n, p in named if not no_decay(n)], "weight_decay": 0.01},
                                 {"params": [p for n, p in named if no_decay(n)], "weight_decay": 0.0}],
                                lr=5e-5, eps=1e-8)

        def call():
            opt.zero_grad(set_to_none=True)
            model(**tb).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        return model, call
    model.eval()
    inputs = {k: v for k, v in tb.items() if k != "labels"}

    def infer():
        with torch.inference_mode():
            model(**inputs).logits.numpy()
    return model, infer


def timed(make: Callable[[], tuple[Callable[[], None], dict]], reps: int) -> tuple[float, dict]:
    """make() -> (call, info); a warm-up call (flaxclf compiles in it), then `reps` timed calls. Returns the median
    (of two: the slower) and info with it and the set-up's seconds. Freed memory is kept first, as the flaxclf
    command keeps it: a thread that malloc'd before that (XLA's, once make() computes) maps its big blocks afresh,
    and every call would page-fault its temporaries again."""
    from flaxclf.runtime import hostmem

    hostmem.keep_freed_memory()
    start = time.perf_counter()
    call, info = make()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]
    return median, {"median_s": round(median, 3), "times_s": [round(t, 2) for t in times],
                    "setup_and_first_call_s": round(first, 1), **info}


def run_process(cmd: list[str]) -> tuple[str, str, int, float]:
    """Runs a measurement's process from the repository root; returns its stdout, stderr, exit code and peak RSS
    in GB (wait4 of the finished child)."""
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read()
    return out, err, os.waitstatus_to_exitcode(status), round(usage.ru_maxrss * 1024 / 1e9, 2)


def measure(cmd: list[str], result: dict) -> dict:
    """`result` with the peak RSS of the measurement's process `cmd`, and the JSON line it printed last, or why it
    failed ("out of memory" where the process was killed or said so, else its last line of stderr)."""
    out, err, code, rss = run_process(cmd)
    result = {**result, "peak_rss_gb": rss}
    if code != 0:
        oom = code < 0 or any(s in err for s in ("MemoryError", "out of memory", "RESOURCE_EXHAUSTED", "bad_alloc",
                                                   "Cannot allocate memory"))
        result["failed"] = "out of memory" if oom else (err.strip().splitlines() or ["?"])[-1][:300]
        return result
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result

