"""DeBERTa-v3's train step and inference: flaxclf against transformers' PyTorch DeBERTa-v2 classes, and against
flaxclf's own BERT of the same shape.

Model: a DeBERTa-v3-xsmall shape with random weights (12 layers, hidden 384, 6 heads, intermediate 1,536, 256
log position buckets a side, shared attention keys, LayerNorm'd relative embeddings, c2p and p2c, no absolute
positions, no token types, its 128,100-token vocabulary), 2 labels. BERT: the same layers, hidden size, heads,
intermediate size and vocabulary, its absolute positions and two token types. Lengths: 32 rows x 128 tokens and
8 x 512, every token real.

  flaxclf       DeBERTa: the job's jitted train step (flaxclf.training.steps.compile_steps on one device: dropout,
                forward, backward, clipping 1.0, masked AdamW) and eval step; disentangled attention by matmuls
                against the relative table and a skew (flaxclf.models.deberta)
  torch         DebertaV2ForSequenceClassification, torch eager, AdamW, clip_grad_norm_(1.0); inference under
                torch.inference_mode()
  flaxclf_bert  flaxclf's BERT (flaxclf.models.bert) of the same shape, the same step

Every (system, step, shape) runs in a process of its own: a warm-up call (flaxclf compiles in it), then `--reps`
timed calls; the figure is the median. flaxclf keeps freed memory and caps that heap as the `flaxclf` command
does; both use the machine's cores as they come. Peak memory is the process's peak RSS (wait4). Prints one JSON
line per process, then per (step, shape) the ratios: flaxclf's speed over torch's and flaxclf's DeBERTa step
time over its BERT's.

    .venv/bin/python bench/deberta_vs_torch.py                       # both shapes, train and infer
    .venv/bin/python bench/deberta_vs_torch.py --shapes 32x128 --what train --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("flaxclf", "torch", "flaxclf_bert")
NUM_LABELS = 2
SHAPE = dict(vocab_size=128100, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             max_position_embeddings=512, hidden_act="gelu")
DEBERTA_V3 = dict(SHAPE, model_type="deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
                  position_buckets=256, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                  position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, pooler_hidden_act="gelu",
                  pooler_dropout=0.0)
BERT = dict(SHAPE, model_type="bert", type_vocab_size=2)


def _batch(rows: int, length: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(0)
    ids = rng.integers(5, vocab, (rows, length)).astype(np.int32)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "labels": rng.integers(0, NUM_LABELS, rows).astype(np.int32), "weight": np.ones(rows, np.float32)}


def flaxclf_calls(system: str, what: str, rows: int, length: int):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from flaxclf.config import MeshConfig, OptimConfig
    from flaxclf.models.classifier import ClassifierConfig, init_params, make_classifier
    from flaxclf.models.registry import encoder_of
    from flaxclf.options import SINGLE
    from flaxclf.runtime import hostmem, sharding
    from flaxclf.training import steps
    from flaxclf.training.optim import make_optimizer

    hostmem.keep_freed_memory()  # as the flaxclf command runs
    hf = DEBERTA_V3 if system == "flaxclf" else BERT
    config = ClassifierConfig.from_hf({**hf, "num_labels": NUM_LABELS}).replace(problem_type=SINGLE)
    model = make_classifier(config)
    params = jax.device_get(init_params(model, jax.random.PRNGKey(0)))
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    tx = make_optimizer(OptimConfig(learning_rate=5e-5, weight_decay=0.01, max_grad_norm=1.0), 10_000,
                        encoder_of(config.backbone).decays)
    shardings = steps.state_shardings(steps.abstract_state(model, tx, jnp.float32), mesh, model)
    train, evaluate = steps.compile_steps(model, tx, SINGLE, 1, mesh, shardings)
    b = jax.device_put({k: jnp.asarray(v) for k, v in _batch(rows, length, SHAPE["vocab_size"]).items()},
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
    hostmem.cap_heap_at_working_set(temp)  # as the flaxclf command caps it by default
    return call, {"xla_temp_gb": round(temp / 1e9, 3)}


def torch_calls(what: str, rows: int, length: int):
    import torch
    import transformers

    from flaxclf.runtime import hostmem

    hostmem.keep_freed_memory()
    torch.manual_seed(0)
    kwargs = {k: v for k, v in DEBERTA_V3.items() if k != "model_type"}
    cfg = transformers.DebertaV2Config(**kwargs, num_labels=NUM_LABELS)
    model = transformers.DebertaV2ForSequenceClassification(cfg)
    b = {k: torch.tensor(v).long() for k, v in _batch(rows, length, cfg.vocab_size).items()
         if k in ("input_ids", "attention_mask", "labels")}
    info = {"torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads()}
    if what == "train":
        model.train()
        no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
        decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
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


def child(system: str, what: str, rows: int, length: int, reps: int) -> None:
    start = time.perf_counter()
    call, info = torch_calls(what, rows, length) if system == "torch" else flaxclf_calls(system, what, rows, length)
    call()  # warm-up (flaxclf: compiles)
    first = time.perf_counter() - start
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    times.sort()
    median = times[len(times) // 2]
    print(json.dumps({"median_s": round(median, 3), "examples_per_s": round(rows / median, 3),
                      "setup_and_first_call_s": round(first, 1), **info}))


def run(system: str, what: str, rows: int, length: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--only", f"{system},{what},{rows},{length}", "--reps", str(reps)]
    with tempfile.TemporaryFile("w+") as errors:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=errors, text=True, cwd=ROOT)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        errors.seek(0)
        err = errors.read()
    result = {"system": system, "what": what, "shape": f"{rows}x{length}",
              "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}
    if os.waitstatus_to_exitcode(status) != 0:
        result["failed"] = (err.strip().splitlines() or ["?"])[-1][:300]
        return result
    result.update(json.loads(out.strip().splitlines()[-1]))
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="32x128,8x512", help="comma list of ROWSxLENGTH")
    p.add_argument("--what", default="train,infer")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        system, what, rows, length = a.only.split(",")
        child(system, what, int(rows), int(length), a.reps)
        return
    print(json.dumps({"machine": {"cpu_count": os.cpu_count()}, "args": vars(a)}), flush=True)
    for shape in a.shapes.split(","):
        rows, length = (int(x) for x in shape.split("x"))
        for what in a.what.split(","):
            results = {}
            for system in a.systems.split(","):
                results[system] = run(system, what, rows, length, a.reps)
                print(json.dumps(results[system]), flush=True)
            line = {"what": what, "shape": shape}
            f, t, b = (results.get(s, {}) for s in SYSTEMS)
            if "median_s" in f and "median_s" in t:
                line["x_torch_speed"] = round(t["median_s"] / f["median_s"], 3)
                line["x_torch_peak_rss"] = round(f["peak_rss_gb"] / t["peak_rss_gb"], 3)
            if "median_s" in f and "median_s" in b:
                line["time_x_flaxclf_bert"] = round(f["median_s"] / b["median_s"], 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
