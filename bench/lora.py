"""LoRA against full fine-tuning, side by side in one run: the train step of a BERT-base shape, and the main job.

  step  BERT-base's shape (12 layers, hidden 768, 12 heads, intermediate 3,072, its 30,522-token vocabulary) with
        random weights, 2 labels, 32 rows x 128 real tokens, fp32: the job's jitted train step
        (flaxclf.training.steps.compile_steps on one device: dropout, forward, backward, clipping 1.0, masked AdamW)
          full   every weight trained
          lora   model.lora rank 8 (alpha 16) on query and value, the classifier trained, the rest frozen
          lora_remat  the same with model.remat (each layer's activations recomputed in the backward pass)
        Each in a process of its own (bench/step_timing.py): a warm-up call (compiling), then `--reps` timed calls,
        the median; the process's peak RSS (wait4) and the step's XLA temporaries. `--rounds` rounds of the
        systems' processes, in turn: a system's time is its fastest process's median (on this machine a process now and
        then runs 10-30% slow throughout; noise only adds time), its peak RSS the largest of its processes'.
  job   the main job (`flaxclf train --config configs/default.yaml`, MiniLM-L6 on rt-snippets-4way) as a whole
        process, each into a fresh run directory with an empty compilation cache:
          full   as configured (every weight, lr 5e-5)
          lora   model.lora rank 8, alpha 16, dropout 0.1 on query and value (the family's default), lr 5e-4 (the
                 LoRA paper's rate for RoBERTa-base; 10x full fine-tuning's, as adapters take)
        Its wall time, peak RSS and test accuracy (the best epoch by validation accuracy).

    .venv/bin/python bench/lora.py                    # both parts
    .venv/bin/python bench/lora.py --parts step --reps 2
Prints one JSON line per process, then one with LoRA's ratios to full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import finetune_vs_torch  # noqa: E402
import step_timing  # noqa: E402

NUM_LABELS = 2
BERT_BASE = dict(model_type="bert", vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                 intermediate_size=3072, max_position_embeddings=512, type_vocab_size=2)
STEP_LORA = dict(rank=8, alpha=16.0)
JOB_LORA = ["model.lora.rank=8", "model.lora.alpha=16", "model.lora.dropout=0.1", "optim.learning_rate=5e-4"]


def step_call(system: str, rows: int, length: int):
    import jax

    from flaxclf.config import LoraConfig
    from flaxclf.hf import peft
    from flaxclf.models.classifier import ClassifierConfig, make_classifier
    from flaxclf.models.registry import encoder_of
    from flaxclf.options import SINGLE

    config = ClassifierConfig.from_hf({**BERT_BASE, "num_labels": NUM_LABELS}).replace(problem_type=SINGLE)
    model = make_classifier(config, remat=system.endswith("remat"))
    if system.startswith("lora"):
        model = peft.with_lora(model, LoraConfig(**STEP_LORA), ())
    b = step_timing.batch(rows, length, BERT_BASE["vocab_size"], NUM_LABELS)
    call, temp = step_timing.flaxclf_call(model, "train", b, encoder_of(config.backbone).decays)
    n = sum(x.size for x in jax.tree.leaves(jax.eval_shape(model.init, jax.random.PRNGKey(0), b["input_ids"][:1],
                                                           b["attention_mask"][:1])))
    return call, {"xla_temp_gb": round(temp / 1e9, 3), "base_params": int(n)}


def run_step(system: str, rows: int, length: int, reps: int) -> dict:
    cmd = [sys.executable, __file__, "--only", f"{system},{rows},{length}", "--reps", str(reps)]
    return step_timing.measure(cmd, {"part": "step", "system": system, "shape": f"{rows}x{length}"})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="step,job")
    p.add_argument("--shape", default="32x128", help="ROWSxLENGTH of the step part")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2, help="step part: rounds of the systems' processes")
    p.add_argument("--systems", default="full,lora,lora_remat", help="step part: the systems, in each round's order")
    p.add_argument("--only", help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="config overrides for both job runs (key=value)")
    a = p.parse_args()
    if a.only:
        system, rows, length = a.only.split(",")
        median, info = step_timing.timed(lambda: step_call(system, int(rows), int(length)), a.reps)
        print(json.dumps({**info, "examples_per_s": round(int(rows) / median, 3)}))
        return
    print(json.dumps({"machine": {"cpu_count": os.cpu_count()}, "args": vars(a)}), flush=True)
    ratios = {}
    if "step" in a.parts:
        rows, length = (int(x) for x in a.shape.split("x"))
        r = {s: [] for s in a.systems.split(",")}
        for _ in range(a.rounds):
            for system in r:
                r[system].append(run_step(system, rows, length, a.reps))
                print(json.dumps(r[system][-1]), flush=True)
        ok = {s: runs for s, runs in r.items() if all("median_s" in x for x in runs)}
        best = {s: min(x["median_s"] for x in runs) for s, runs in ok.items()}
        rss = {s: max(x["peak_rss_gb"] for x in runs) for s, runs in ok.items()}
        ratios["step_s"] = {s: round(v, 3) for s, v in best.items()}
        ratios["step_peak_rss_gb"] = rss
        for s in (s for s in ok if s != "full" and "full" in ok):
            ratios[f"step_speed_{s}_over_full"] = round(best["full"] / best[s], 3)
            ratios[f"step_peak_rss_{s}_over_full"] = round(rss[s] / rss["full"], 3)
    if "job" in a.parts:
        r = {}
        for system, extra in (("full", []), ("lora", JOB_LORA)):
            with tempfile.TemporaryDirectory(prefix="lora-bench-") as work:
                r[system] = {"part": "job", **finetune_vs_torch.run_flaxclf(
                    system, "configs/default.yaml", [*extra, *a.overrides], Path(work))}
            print(json.dumps(r[system]), flush=True)
        ratios["job_wall_lora_over_full"] = round(r["lora"]["wall_s"] / r["full"]["wall_s"], 3)
        ratios["job_peak_rss_lora_over_full"] = round(r["lora"]["peak_rss_gb"] / r["full"]["peak_rss_gb"], 3)
        ratios["job_test_accuracy"] = {s: round(x["test"]["accuracy"], 4) for s, x in r.items()}
    print(json.dumps({"ratios": ratios}), flush=True)


if __name__ == "__main__":
    main()
