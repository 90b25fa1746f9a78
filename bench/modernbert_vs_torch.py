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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_timing  # noqa: E402

SYSTEMS = ("flaxclf", "torch")
NUM_LABELS = 2


def _config() -> dict:
    return dict(max_position_embeddings=8192, pad_token_id=0)  # ModernBertConfig's defaults for the rest


def flaxclf_calls(what: str, rows: int, length: int, remat: bool):
    from flaxclf.models.classifier import ClassifierConfig, make_classifier
    from flaxclf.models.modernbert import ModernBertSpec
    from flaxclf.models.modernbert.family import decays as modernbert_decays
    from flaxclf.options import SINGLE

    spec = ModernBertSpec(**_config())
    model = make_classifier(ClassifierConfig(backbone=spec, num_labels=NUM_LABELS, problem_type=SINGLE), remat=remat)
    b = step_timing.batch(rows, length, spec.vocab_size, NUM_LABELS)
    call, temp = step_timing.flaxclf_call(model, what, b, modernbert_decays)
    return call, {"xla_temp_gb": round(temp / 1e9, 3), "heads": spec.num_attention_heads,
                  "global_layers": sum(spec.is_global(i) for i in range(spec.num_hidden_layers))}


def torch_calls(what: str, rows: int, length: int, remat: bool):
    import torch
    import transformers

    def build():
        cfg = transformers.ModernBertConfig(**_config(), num_labels=NUM_LABELS, reference_compile=False)
        model = transformers.ModernBertForSequenceClassification(cfg)
        if remat and what == "train":
            model.gradient_checkpointing_enable()
        return model

    b = step_timing.batch(rows, length, transformers.ModernBertConfig().vocab_size, NUM_LABELS)
    model, call = step_timing.torch_call(build, what, b, lambda n: n.endswith("bias") or "norm" in n)
    return call, {"attn_implementation": model.config._attn_implementation, "torch": torch.__version__,
                  "transformers": transformers.__version__}


def child(system: str, what: str, length: int, tokens: int, reps: int, remat: bool) -> None:
    rows = max(1, tokens // length)

    def make():
        return (flaxclf_calls if system == "flaxclf" else torch_calls)(what, rows, length, remat)
    median, info = step_timing.timed(make, reps)
    print(json.dumps({"rows": rows, **info, "examples_per_s": round(rows / median, 3),
                      "tokens_per_s": round(rows * length / median, 1), "remat": remat}))


def run(system: str, what: str, length: int, a: argparse.Namespace) -> dict:
    long = length >= a.remat_from
    cmd = [sys.executable, __file__, "--only", f"{system},{what},{length},{int(long and what == 'train')}",
           "--tokens", str(a.tokens), "--reps", str(a.reps_long if long else a.reps), "--mem-gib", str(a.mem_gib)]
    return step_timing.measure(cmd, {"system": system, "what": what, "length": length})


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
