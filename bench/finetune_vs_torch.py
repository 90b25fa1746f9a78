"""The default fine-tune (MiniLM-L6 on rt-snippets-4way) in flaxclf and in PyTorch, side by side, one process each.

PyTorch reference: transformers' BertForSequenceClassification, torch eager, the same pretrained weights, the
same split, the same tokens (flaxclf's tokenized splits), the same hyperparameters (AdamW lr 5e-5, weight decay
0.01 without biases/LayerNorm, eps 1e-8, linear warmup 6% then linear decay, global-norm clipping 1.0,
batch 32, 3 epochs, eval each epoch, the best epoch by validation accuracy scored on test) and HF's dynamic
padding (each batch padded to its own longest row), as Trainer + DataCollatorWithPadding do.

    .venv/bin/python bench/finetune_vs_torch.py            # both, then the ratio of wall times
    .venv/bin/python bench/finetune_vs_torch.py --only torch
Both use the machine's cores as they come (torch: torch.get_num_threads()), and both processes run with
flaxclf.hostmem.keep_freed_memory(), as the `flaxclf` command does. Prints one JSON line per system.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _splits(cfg):
    from flaxclf import assets, data

    model_dir = assets.resolve_model(cfg.model.name)
    task, splits = data.load_task(cfg.data, model_dir, process_index=0, process_count=1)
    return model_dir, task, splits


def _rows(split):
    o = split.offsets
    return [(split.input_ids[o[i]:o[i + 1]].tolist(), split.token_type_ids[o[i]:o[i + 1]].tolist())
            for i in range(len(split))]


def torch_reference(config: str, overrides: list[str]) -> dict:
    """PyTorch's fine-tune with transformers' BertForSequenceClassification."""
    import numpy as np
    import torch
    import transformers

    from flaxclf import metrics
    from flaxclf.config import load_config

    cfg = load_config(config, overrides)
    t0 = time.perf_counter()
    model_dir, task, splits = _splits(cfg)
    torch.manual_seed(cfg.train.seed)
    model = transformers.BertForSequenceClassification.from_pretrained(model_dir, num_labels=task.num_labels)
    decay = [p for n, p in model.named_parameters() if not (n.endswith("bias") or "LayerNorm" in n)]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias") or "LayerNorm" in n]
    o = cfg.optim
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": o.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=o.learning_rate, betas=(o.b1, o.b2),
                            eps=o.eps)
    rows = {s: _rows(sp) for s, sp in splits.items()}
    labels = {s: torch.tensor(sp.labels, dtype=torch.long) for s, sp in splits.items()}
    bs = cfg.train.global_batch_size
    steps_per_epoch = -(-len(rows["train"]) // bs)  # DataLoader(drop_last=False)
    total = steps_per_epoch * cfg.train.epochs
    warmup = int(np.ceil(o.warmup_ratio * total))
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)

    def collate(idx, split):
        batch = [rows[split][i] for i in idx]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        tt = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, (a, t) in enumerate(batch):
            ids[r, :len(a)], tt[r, :len(a)], mask[r, :len(a)] = torch.tensor(a), torch.tensor(t), 1
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}

    def evaluate(split):
        model.eval()
        logits = []
        with torch.no_grad():
            for s in range(0, len(rows[split]), cfg.train.eval_batch_size):
                idx = list(range(s, min(s + cfg.train.eval_batch_size, len(rows[split]))))
                logits.append(model(**collate(idx, split)).logits.numpy())
        model.train()
        return metrics.scalars(metrics.compute_metrics(task.problem_type, np.concatenate(logits),
                                                       labels[split].numpy(), None, task.label_names))

    best, best_state, gen = None, None, torch.Generator().manual_seed(cfg.train.seed)
    model.train()
    t_train = time.perf_counter()
    for _ in range(cfg.train.epochs):
        order = torch.randperm(len(rows["train"]), generator=gen).tolist()
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            out = model(**collate(idx, "train"), labels=labels["train"][idx])
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.max_grad_norm)
            opt.step()
            sched.step()
            opt.zero_grad()
        val = evaluate("validation")
        if best is None or val["accuracy"] > best["accuracy"]:
            best, best_state = val, {k: v.clone() for k, v in model.state_dict().items()}
    train_s = time.perf_counter() - t_train
    model.load_state_dict(best_state)
    test = evaluate("test")
    return {"system": "pytorch", "torch": torch.__version__, "threads": torch.get_num_threads(),
            "validation": best, "test": test, "steps": total, "train_s": train_s,
            "wall_s": time.perf_counter() - t0}


def flaxclf_run(config: str, overrides: list[str]) -> dict:
    from flaxclf.config import load_config
    from flaxclf.train import run

    cfg = load_config(config, overrides + ["checkpoint.fresh=true"])
    s = run(cfg, show_progress=False)
    return {"system": "flaxclf", "validation": s["validation"], "test": s["test"], "steps": s["steps"],
            "wall_s": s["wall_s"], "exported": s["exported"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["torch", "flaxclf"], default=None)
    p.add_argument("--config", default=str(ROOT / "configs/default.yaml"))
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args()
    if a.only is None:  # each system in its own process, one after the other, so neither warms the other
        results = []
        for which in ("flaxclf", "torch"):
            cmd = [sys.executable, __file__, "--only", which, "--config", a.config, *a.overrides]
            # stderr passes through, so that a failing system shows why
            line = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout.strip().splitlines()[-1]
            print(line, flush=True)
            results.append(json.loads(line))
        f, t = results
        ratio = {"wall_time_ratio_flaxclf_over_torch": f["wall_s"] / t["wall_s"],
                 "test_accuracy_delta": f["test"]["accuracy"] - t["test"]["accuracy"]}
        print(json.dumps(ratio))
        results.append(ratio)
    else:
        from flaxclf.hostmem import keep_freed_memory

        keep_freed_memory()
        fn = torch_reference if a.only == "torch" else flaxclf_run
        results = [{**fn(a.config, a.overrides), "overrides": a.overrides}]
        print(json.dumps(results[0]), flush=True)
    if a.out:
        with open(a.out, "a") as fh:
            for r in results:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
