"""ModernBERT's train step and inference at long lengths: flaxclf against transformers' PyTorch ModernBERT.

Model: a base-sized random ModernBERT (transformers' ModernBertConfig defaults: 22 layers, hidden 768, 12 heads,
GeGLU 1152, a global layer every 3, local window 128, 8,192 positions), 2 labels. Each length runs a batch of
`--tokens` tokens (default 2,048: 4 rows of 512, 1 of 2,048; at least one row, so 1 of 8,192), every row real
(no padding). Lengths from `--remat-from` (default 8,192) train with gradient checkpointing in both systems
(flaxclf model.remat, torch's gradient_checkpointing_enable()): without it a base model's step at 8,192 tokens
wants ~22 GB of activations in flaxclf (XLA: "Out of memory allocating 21661517252 bytes" at 16 x 512), more than
this machine has; those lengths time `--reps-long` calls.

  flaxclf  the job's jitted train step (flaxclf.training.steps.compile_steps on one device: dropout, forward, backward,
           clipping 1.0, masked AdamW) and eval step; global layers a block of 512 queries at a time (recomputed
           in the backward pass), local layers banded (flaxclf.models.modernbert)
  torch    ModernBertForSequenceClassification, torch eager, transformers' default attention for it (reported),
           AdamW, clip_grad_norm_(1.0); inference under torch.inference_mode()

Every (system, step, length) runs in a process of its own: a warm-up call (flaxclf compiles in it), then `--reps`
timed calls; the figure is the median (of two: the slower). flaxclf keeps freed memory and caps that heap as the
`flaxclf` command does. Peak memory is the process's peak RSS (wait4), and beside it the bytes of
one global layer's [B, H, L, L] fp32 attention scores, which a dense implementation holds per layer (and keeps,
with the probabilities, for every global layer when it trains). A process that runs out of memory (an address
space cap of --mem-gib) is reported as such.

    .venv/bin/python bench/modernbert_vs_torch.py                        # 512, 2048, 8192; train and infer
    .venv/bin/python bench/modernbert_vs_torch.py --lengths 512 --what infer --reps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("flaxclf", "torch")
NUM_LABELS = 2


def _config() -> dict:
    return dict(max_position_embeddings=8192, pad_token_id=0)  # ModernBertConfig's defaults for the rest


def _batch(rows: int, length: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, NUM_LABELS, rows).astype(np.int32), "weight": np.ones(rows, np.float32)}


def flaxclf_calls(what: str, rows: int, length: int, remat: bool):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.modernbert import ModernBertSpec
    from flaxclf.models.modernbert.family import decays as modernbert_decays
    from flaxclf.options import SINGLE
    from flaxclf.runtime import hostmem, sharding
    from flaxclf.training import steps
    from flaxclf.training.optim import make_optimizer

    hostmem.keep_freed_memory()  # as the flaxclf command runs
    spec = ModernBertSpec(**_config())
    model = make_classifier(ClassifierConfig(backbone=spec, num_labels=NUM_LABELS, problem_type=SINGLE), remat=remat)
    params = jax.device_get(init_params(model, jax.random.PRNGKey(0)))
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0), 10_000,
                        modernbert_decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, evaluate = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    b = jax.device_put({k: jnp.asarray(v) for k, v in _batch(rows, length, spec.vocab_size).items()},
                       sharding.batch_sharding(mesh))
    if what == "train":
        holder = {"state": steps.create_state(params, tx, shardings, seed=0)}
        del params
        temp = train.lower(holder["state"], b).compile().memory_analysis().temp_size_in_bytes

        def call():
            holder["state"], m = train(holder["state"], b)
            jax.block_until_ready(m["loss"])
    else:
        placed = steps.place(params, shardings.params)
        del params
        temp = evaluate.lower(placed, b).compile().memory_analysis().temp_size_in_bytes

        def call():
            np.asarray(evaluate(placed, b))
    # As the flaxclf command caps it by default; the cap's thread runs until the process ends.
    hostmem.cap_heap_at_working_set(temp)
    return call, {"xla_temp_gb": round(temp / 1e9, 3), "heads": spec.num_attention_heads,
                  "global_layers": sum(spec.is_global(i) for i in range(spec.num_hidden_layers))}


def torch_calls(what: str, rows: int, length: int, remat: bool):
    import torch
    import transformers

    from flaxclf.runtime import hostmem

    hostmem.keep_freed_memory()
    torch.manual_seed(0)
    cfg = transformers.ModernBertConfig(**_config(), num_labels=NUM_LABELS, reference_compile=False)
    model = transformers.ModernBertForSequenceClassification(cfg)
    b = {k: torch.tensor(v).long() for k, v in _batch(rows, length, cfg.vocab_size).items()
         if k in ("input_ids", "attention_mask", "labels")}
    info = {"attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
            "transformers": transformers.__version__}
    if what == "train":
        model.train()
        if remat:
            model.gradient_checkpointing_enable()
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "norm" in n]
        decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "norm" in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                lr=5e-5, eps=1e-8)

        def call():
            opt.zero_grad(set_to_none=True)
            model(**b).loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
    else:
        model.eval()
        inputs = {k: v for k, v in b.items() if k != "labels"}

        def call():
            with torch.inference_mode():
                model(**inputs).logits.numpy()
    return call, info


def child(system: str, what: str, length: int, tokens: int, reps: int, remat: bool) -> None:
    rows = max(1, tokens // length)
    start = time.perf_counter()
    call, info = (flaxclf_calls if system == "flaxclf" else torch_calls)(what, rows, length, remat)
    call()  # warm-up (flaxclf: compiles)
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"rows": rows, "median_s": round(median, 3), "examples_per_s": round(rows / median, 3),
                      "tokens_per_s": round(rows * length / median, 1), "setup_and_first_call_s": round(first, 1),
                      "remat": remat, **info}))


def run(system: str, what: str, length: int, a: argparse.Namespace) -> dict:
    long = length >= a.remat_from
    cmd = [sys.executable, __file__, "--only", f"{system},{what},{length},{int(long and what == 'train')}",
           "--tokens", str(a.tokens), "--reps", str(a.reps_long if long else a.reps), "--mem-gib", str(a.mem_gib)]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read()
    result = {"system": system, "what": what, "length": length,
              "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        oom = code < 0 or any(s in err for s in ("MemoryError", "out of memory", "RESOURCE_EXHAUSTED", "bad_alloc",
                                                   "Cannot allocate memory"))
        result["failed"] = "out of memory" if oom else (err.strip().splitlines() or ["?"])[-1][:300]
        return result
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", default="512,2048,8192")
    p.add_argument("--what", default="train,infer")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (rows = tokens // length, >= 1)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--remat-from", type=int, default=8192, help="train lengths from here with gradient checkpointing")
    p.add_argument("--reps-long", type=int, default=1, help="timed calls at lengths from --remat-from")
    p.add_argument("--mem-gib", type=float, default=20.0, help="address-space cap of each process")
    p.add_argument("--only", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        resource.setrlimit(resource.RLIMIT_AS, (int(a.mem_gib * 2**30),) * 2)
        system, what, length, remat = a.only.split(",")
        child(system, what, int(length), a.tokens, a.reps, remat == "1")
        return
    print(json.dumps({"machine": {"cpu_count": os.cpu_count()}, "args": vars(a)}), flush=True)
    for length in (int(x) for x in a.lengths.split(",")):
        for what in a.what.split(","):
            results = {}
            for system in a.systems.split(","):
                results[system] = run(system, what, length, a)
                print(json.dumps(results[system]), flush=True)
            rows = max(1, a.tokens // length)
            scores = rows * 12 * length * length * 4
            line = {"what": what, "length": length, "rows": rows,
                    "one_global_layer_scores_gb": round(scores / 1e9, 2)}
            f, t = results.get("flaxclf", {}), results.get("torch", {})
            if "examples_per_s" in f and "examples_per_s" in t:
                line["x_torch_speed"] = round(f["examples_per_s"] / t["examples_per_s"], 3)
                line["x_torch_peak_rss"] = round(f["peak_rss_gb"] / t["peak_rss_gb"], 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
