"""BERT-base fine-tuning step on one GPU: flaxclf (bf16 compute over fp32 params) next to torch eager with bf16
autocast, each at the largest batch that fits, in examples/s and MFU.

Model: BERT-base from BertConfig() with random weights (the GPU machine has no internet, so no checkpoint is
fetched; speed does not depend on the values), 4 labels, length 128, dropout on, global-norm clipping 1.0,
AdamW. flaxclf: the job's own step (flaxclf.training.steps.compile_steps, 1-device mesh, flaxclf's BERT encoder,
dtype=bfloat16). PyTorch: transformers' BertForSequenceClassification (SDPA attention), torch.autocast(bf16),
fused AdamW when CUDA is there, clip_grad_norm_.

Batch search: powers of two from --min-batch up to --max-batch; the largest batch whose step runs (no
out-of-memory error) is kept, separately for each system. Then both are timed at their batch, interleaved,
--reps rounds, medians (see bench/step_vs_torch.py for the method).

MFU = examples/s x FLOP per example / peak. FLOP per example (NOTES.md): 6 x 85.6M non-embedding params x 128
tokens + attention = 67.6 GFLOP per sequence of 128 (forward + backward); in general
6 * N_nonemb * L + 12 * layers * L^2 * hidden. Peak: --peak-tflops, default 989 (H100 SXM / H200, dense bf16).
The formula is the full model's for both systems; flaxclf's [CLS]-only last layer does ~8% less of it on
BERT-base (nearly all of one layer in 12: it projects no keys or values and computes position 0 alone), so its
MFU counts model FLOPs, not executed ones.
flaxclf's bf16 is its encoder's mixed precision (bf16 matmuls with fp32 accumulation, fp32 elementwise), as
autocast.

    .venv/bin/python bench/gpu_bert_base.py                   # on the GPU machine
    .venv/bin/python bench/gpu_bert_base.py --smoke           # tiny config on CPU: checks that it all runs
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # let torch and jax share the GPU's memory
sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import step_vs_torch as svt  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.classifier import ClassifierConfig, init_params
from flaxclf.options import SINGLE  # noqa: E402

FLOP_PER_SEQ_128 = 67.6e9  # NOTES.md, BERT-base at length 128


def flop_per_example(spec: BertSpec, length: int) -> float:
    """6 * non-embedding params * tokens (matmuls, fwd + bwd) + 12 * layers * L^2 * hidden (attention scores and
    weighted sum, fwd + bwd). BERT-base at 128: 6 * 85.6M (encoder + pooler) * 128 + 12 * 12 * 128^2 * 768
    = 65.8e9 + 1.8e9 = 67.6e9, the figure of NOTES.md."""
    d, f, n = spec.hidden_size, spec.intermediate_size, spec.num_hidden_layers
    nonemb = n * (4 * d * d + 2 * d * f + 9 * d + f) + d * d + d
    return 6.0 * nonemb * length + 12.0 * n * length * length * d


def _oom(e: BaseException) -> bool:
    s = str(e)
    return "RESOURCE_EXHAUSTED" in s or "out of memory" in s.lower() or isinstance(e, torch.cuda.OutOfMemoryError)


def _torch_fn(params: dict, hf: transformers.BertConfig, batch: dict, device: str):
    model = svt.torch_model(params, hf, train=True).to(device)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                            lr=5e-5, eps=1e-8, fused=device == "cuda")
    t = {k: torch.tensor(batch[k]).long().to(device) for k in ("input_ids", "attention_mask", "token_type_ids",
                                                                 "labels")}

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(**t).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device == "cuda":
            torch.cuda.synchronize()
    return step, model


def make(system: str, spec: BertSpec, params: dict, batch: int, length: int, device: str):
    b = svt.make_batch(batch, length, spec.vocab_size)
    if system == "torch":
        cfg = ClassifierConfig(backbone=spec, num_labels=svt.NUM_LABELS, problem_type=SINGLE)
        return _torch_fn(params, cfg.to_hf_config(), b, device)
    model = BertClassifier(ClassifierConfig(backbone=spec, num_labels=svt.NUM_LABELS, problem_type=SINGLE),
                           dtype=jnp.bfloat16)
    train, _, keep = svt.flax_fns(model, params, b, b)
    return train, keep


def _fits(system: str, spec: BertSpec, params: dict, batch: int, length: int, device: str) -> bool:
    """Whether two steps run at this batch; everything built is freed on return."""
    try:
        step, _ = make(system, spec, params, batch, length, device)
        step(), step()
        return True
    except Exception as e:  # noqa: BLE001 - only out-of-memory ends the search quietly
        if not _oom(e):
            raise
        return False


def largest_batch(system: str, spec: BertSpec, params: dict, length: int, lo: int, hi: int, device: str) -> int:
    best, batch = 0, lo
    while batch <= hi:
        fits = _fits(system, spec, params, batch, length, device)
        gc.collect()
        jax.clear_caches()
        if device == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps({"search": system, "batch": batch, "fits": fits}), flush=True)
        if not fits:
            break
        best, batch = batch, batch * 2
    if best == 0:
        raise SystemExit(f"{system}: not even batch {lo} fits; lower --min-batch")
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny BERT on CPU, batches 2..8: checks the script runs")
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--min-batch", type=int, default=32)
    p.add_argument("--max-batch", type=int, default=2048)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of one GPU")
    a = p.parse_args()
    if a.smoke:
        spec = BertSpec(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
        a.min_batch, a.max_batch, a.reps, a.length = 2, 8, 3, 32
    else:
        spec = BertSpec()  # BERT-base, random init (no internet on the GPU box)
    device = "cuda" if torch.cuda.is_available() and not a.smoke else "cpu"
    params = jax.device_get(init_params(BertClassifier(ClassifierConfig(backbone=spec, num_labels=svt.NUM_LABELS)),
                                        jax.random.PRNGKey(0)))
    flop = flop_per_example(spec, a.length)
    print(json.dumps({"jax_devices": [str(d) for d in jax.devices()], "torch_device": device,
                      "torch_gpu": torch.cuda.get_device_name() if device == "cuda" else None,
                      "model": "smoke-tiny" if a.smoke else "bert-base BertConfig() random init",
                      "length": a.length, "flop_per_example": flop, "peak_tflops": a.peak_tflops}), flush=True)
    batches = {s: largest_batch(s, spec, params, a.length, a.min_batch, a.max_batch, device)
               for s in ("flaxclf_bf16", "torch")}
    fns, keep = {}, []
    for s, b in batches.items():
        step, k = make(s, spec, params, b, a.length, device)
        fns[s] = step
        keep.append(k)
    times, _ = svt.interleaved(fns, a.reps)
    out = {}
    for s, ts in times.items():
        ex_s = batches[s] / sorted(ts)[len(ts) // 2]
        out[s] = {"batch": batches[s], "examples_per_s": round(ex_s, 1),
                  "mfu": round(ex_s * flop / (a.peak_tflops * 1e12), 4)}
    out["flaxclf_over_torch"] = round(out["flaxclf_bf16"]["examples_per_s"] / out["torch"]["examples_per_s"], 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
