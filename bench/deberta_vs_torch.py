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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_timing  # noqa: E402

SYSTEMS = ("flaxclf", "torch", "flaxclf_bert")
NUM_LABELS = 2
SHAPE = dict(vocab_size=128100, hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536,
             max_position_embeddings=512, hidden_act="gelu")
DEBERTA_V3 = dict(SHAPE, model_type="deberta-v2", relative_attention=True, pos_att_type=["p2c", "c2p"],
                  position_buckets=256, max_relative_positions=-1, share_att_key=True, norm_rel_ebd="layer_norm",
                  position_biased_input=False, type_vocab_size=0, layer_norm_eps=1e-7, pooler_hidden_act="gelu",
                  pooler_dropout=0.0)
BERT = dict(SHAPE, model_type="bert", type_vocab_size=2)


def flaxclf_calls(system: str, what: str, rows: int, length: int):
    from flaxclf.models.classifier import ClassifierConfig, make_classifier
    from flaxclf.models.registry import encoder_of
    from flaxclf.options import SINGLE

    hf = DEBERTA_V3 if system == "flaxclf" else BERT
    config = ClassifierConfig.from_hf({**hf, "num_labels": NUM_LABELS}).replace(problem_type=SINGLE)
    b = step_timing.batch(rows, length, SHAPE["vocab_size"], NUM_LABELS)
    call, temp = step_timing.flaxclf_call(make_classifier(config), what, b, encoder_of(config.backbone).decays)
    return call, {"xla_temp_gb": round(temp / 1e9, 3)}


def torch_calls(what: str, rows: int, length: int):
    import torch
    import transformers

    def build():
        kwargs = {k: v for k, v in DEBERTA_V3.items() if k != "model_type"}
        return transformers.DebertaV2ForSequenceClassification(
            transformers.DebertaV2Config(**kwargs, num_labels=NUM_LABELS))

    b = step_timing.batch(rows, length, SHAPE["vocab_size"], NUM_LABELS)
    _, call = step_timing.torch_call(build, what, b, lambda n: n.endswith("bias") or "LayerNorm" in n)
    return call, {"torch": torch.__version__, "transformers": transformers.__version__,
                  "threads": torch.get_num_threads()}


def child(system: str, what: str, rows: int, length: int, reps: int) -> None:
    def make():
        return torch_calls(what, rows, length) if system == "torch" else flaxclf_calls(system, what, rows, length)
    median, info = step_timing.timed(make, reps)
    print(json.dumps({**info, "examples_per_s": round(rows / median, 3)}))


def run(system: str, what: str, rows: int, length: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--only", f"{system},{what},{rows},{length}", "--reps", str(reps)]
    return step_timing.measure(cmd, {"system": system, "what": what, "shape": f"{rows}x{length}"})


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
