"""The default fine-tune (MiniLM-L6 on rt-snippets-4way) in flaxclf and in PyTorch, side by side, one process each.

PyTorch reference: transformers' BertForSequenceClassification, torch eager, the same pretrained weights, the
same split, the same tokens (flaxclf's tokenized splits), the same hyperparameters (AdamW lr 5e-5, weight decay
0.01 without biases/LayerNorm, eps 1e-8, linear warmup 6% then linear decay, global-norm clipping 1.0,
batch 32, 3 epochs, eval each epoch, the best epoch by validation accuracy scored on test) and HF's dynamic
padding (each batch padded to its own longest row), as Trainer + DataCollatorWithPadding do. Three references:
  torch               random batches (Trainer's default sampler), fp32
  torch_grouped       Trainer's group_by_length=True: megabatches of 50 batches sorted by length
                      (transformers' get_length_grouped_indices, for training and evaluation), fp32
  torch_grouped_bf16  the same under torch.autocast("cpu", torch.bfloat16), as Trainer's bf16=True runs it
and four flaxclf runs of the real `flaxclf train` command, each into a fresh run directory:
  flaxclf             configs/default.yaml (fp32, packed rows), with an empty compilation cache
  flaxclf_second      the same command again: its executables come from the cache the first run filled
  flaxclf_bucketed    the same with data.packing=off (length buckets; its shapes are its own: compiled afresh)
  flaxclf_bf16        configs/cpu-bf16.yaml (its own shapes and dtypes: compiled afresh)

    .venv/bin/python bench/finetune_vs_torch.py                  # every system, then the ratios
    .venv/bin/python bench/finetune_vs_torch.py --systems flaxclf,torch_grouped
Every system runs as a whole process, one after the other, timed from its start to its exit (imports
included), with its peak RSS (getrusage of the finished child). Both use the machine's cores as they come
(torch: torch.get_num_threads()); the torch processes call flaxclf.runtime.hostmem.keep_freed_memory() as the flaxclf
command does. Prints one JSON line per system, then one with the ratios.
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
SYSTEMS = ("flaxclf", "flaxclf_second", "flaxclf_bucketed", "flaxclf_bf16", "torch_grouped", "torch_grouped_bf16",
           "torch")
FLAXCLF_CONFIG = {"flaxclf": "configs/default.yaml", "flaxclf_second": "configs/default.yaml",
                  "flaxclf_bucketed": "configs/default.yaml", "flaxclf_bf16": "configs/cpu-bf16.yaml"}
FLAXCLF_OVERRIDES = {"flaxclf_bucketed": ["data.packing=off"]}


def _splits(cfg):
    from flaxclf import assets, data

    model_dir = assets.resolve_model(cfg.model.name)
    task, splits = data.load_task(cfg.data, model_dir, process_index=0, process_count=1)
    return model_dir, task, splits


def _rows(split):
    o = split.offsets
    return [(split.input_ids[o[i]:o[i + 1]].tolist(), split.token_type_ids[o[i]:o[i + 1]].tolist())
            for i in range(len(split))]


def torch_reference(config: str, overrides: list[str], grouped: bool, bf16: bool) -> dict:
    """PyTorch's fine-tune with transformers' BertForSequenceClassification."""
    import numpy as np
    import torch
    import transformers
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from flaxclf.config import load_config
    from flaxclf.training import metrics

    cfg = load_config(config, overrides)
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
    lengths = {s: [len(ids) for ids, _ in r] for s, r in rows.items()}
    labels = {s: torch.tensor(sp.labels, dtype=torch.long) for s, sp in splits.items()}
    bs, ebs = cfg.train.global_batch_size, cfg.train.eval_batch_size
    steps_per_epoch = -(-len(rows["train"]) // bs)  # DataLoader(drop_last=False)
    total = steps_per_epoch * cfg.train.epochs
    warmup = int(np.ceil(o.warmup_ratio * total))
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    gen = torch.Generator().manual_seed(cfg.train.seed)

    def order(split: str, batch: int) -> list[int]:
        if grouped:  # Trainer's LengthGroupedSampler, for training and (group_by_length) evaluation alike
            return get_length_grouped_indices(lengths[split], batch, generator=gen)
        if split == "train":
            return torch.randperm(len(rows[split]), generator=gen).tolist()
        return list(range(len(rows[split])))

    def collate(idx, split):
        batch = [rows[split][i] for i in idx]
        n = max(len(ids) for ids, _ in batch)
        ids = torch.zeros((len(batch), n), dtype=torch.long)
        tt = torch.zeros_like(ids)
        mask = torch.zeros_like(ids)
        for r, (a, t) in enumerate(batch):
            ids[r, :len(a)], tt[r, :len(a)], mask[r, :len(a)] = torch.tensor(a), torch.tensor(t), 1
        return {"input_ids": ids, "token_type_ids": tt, "attention_mask": mask}

    def autocast():
        return torch.autocast("cpu", torch.bfloat16, enabled=bf16)

    def evaluate(split):
        model.eval()
        idx_all = order(split, ebs)
        logits = np.zeros((len(idx_all), task.num_labels), np.float32)
        with torch.no_grad(), autocast():
            for s in range(0, len(idx_all), ebs):
                idx = idx_all[s:s + ebs]
                logits[idx] = model(**collate(idx, split)).logits.float().numpy()
        model.train()
        return metrics.scalars(metrics.compute_metrics(task.problem_type, logits, labels[split].numpy(), None,
                                                       task.label_names))

    best, best_state = None, None
    model.train()
    t_train = time.perf_counter()
    tokens = 0
    for _ in range(cfg.train.epochs):
        epoch_order = order("train", bs)
        for s in range(0, len(epoch_order), bs):
            idx = epoch_order[s:s + bs]
            batch = collate(idx, "train")
            tokens += batch["input_ids"].numel()
            with autocast():
                out = model(**batch, labels=labels["train"][idx])
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
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "validation": best, "test": test,
            "steps": total, "train_s": train_s, "padded_tokens_per_row": tokens / (total * bs)}


def run_system(name: str, a: argparse.Namespace, work: Path) -> dict:
    """One system as a whole process: its wall time from start to exit, its peak RSS, and its results."""
    if name.startswith("flaxclf"):
        return run_flaxclf(name, FLAXCLF_CONFIG[name], [*FLAXCLF_OVERRIDES.get(name, []), *a.overrides], work)
    cmd = [sys.executable, __file__, "--only", name, "--config", str(ROOT / "configs/default.yaml"), *a.overrides]
    return _timed_process(name, cmd, result_line=True)


def run_flaxclf(name: str, config: str, overrides: list[str], work: Path) -> dict:
    """The real `flaxclf train` command as a whole process into <work>/<name>, with the compilation cache of
    <work>/xla: its wall time, peak RSS and its summary's results."""
    run_dir = work / name
    cmd = [sys.executable, "-m", "flaxclf.cli", "train", "--config", str(ROOT / config), f"train.output_dir={run_dir}",
           f"train.compilation_cache_dir={work / 'xla'}", "--no-progress", *overrides]
    out = _timed_process(name, cmd)
    summary = json.loads((run_dir / "summary.json").read_text())
    out.update({"validation": summary["validation"], "test": summary["test"], "steps": summary["steps"],
                "time": summary["time"], "batches": summary["batches"], "host_memory": summary.get("host_memory")})
    return out


def _timed_process(name: str, cmd: list[str], result_line: bool = False) -> dict:
    """A system's process from start to exit (stderr passes through, so that a failing system shows why): its wall
    time and peak RSS (wait4), and with `result_line` the JSON line it prints last (torch's results)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{name} failed:\n{stdout[-3000:]}")
    out = {"system": name, "wall_s": round(wall, 1), "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 3)}
    if result_line:
        out.update(json.loads(stdout.strip().splitlines()[-1]))
    return out


def ratios(r: dict) -> dict:
    """Wall-time, accuracy and memory ratios of each flaxclf run against its reference."""
    out = {}
    pairs = [("flaxclf", "torch_grouped"), ("flaxclf_bf16", "torch_grouped_bf16"), ("flaxclf", "torch"),
             ("flaxclf_second", "torch_grouped"), ("flaxclf_bucketed", "torch_grouped"),
             ("flaxclf", "flaxclf_bucketed")]
    for f, t in pairs:
        if f in r and t in r:
            out[f"{f}/{t}"] = {"wall": round(r[f]["wall_s"] / r[t]["wall_s"], 3),
                               "test_accuracy_delta": round(r[f]["test"]["accuracy"] - r[t]["test"]["accuracy"], 4),
                               "peak_rss": round(r[f]["peak_rss_gb"] / r[t]["peak_rss_gb"], 3)}
    for f in (k for k in r if k.startswith("flaxclf")):
        out[f"{f}_compile_phase_share_of_wall"] = round(r[f]["time"]["phases_s"]["compile"] / r[f]["wall_s"], 3)
    if "flaxclf" in r and "flaxclf_second" in r:
        first, second = (r[k]["time"]["compilation"]["seconds"] for k in ("flaxclf", "flaxclf_second"))
        out["compilation_second_over_first"] = round(second / first, 3) if first else None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    p.add_argument("--only", choices=["torch", "torch_grouped", "torch_grouped_bf16"], default=None,
                   help=argparse.SUPPRESS)  # one torch system, in this process (what --systems runs)
    p.add_argument("--config", default=str(ROOT / "configs/default.yaml"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="append the JSON lines to this file")
    p.add_argument("overrides", nargs="*", help="config overrides for every system (key=value)")
    a = p.parse_args()
    if a.only:
        from flaxclf.runtime.hostmem import keep_freed_memory

        keep_freed_memory()
        print(json.dumps(torch_reference(a.config, a.overrides, grouped=a.only != "torch",
                                         bf16=a.only.endswith("bf16"))), flush=True)
        return
    systems = a.systems.split(",")
    unknown = set(systems) - set(SYSTEMS)
    if unknown or ("flaxclf_second" in systems and "flaxclf" not in systems):
        p.error(f"unknown systems {sorted(unknown)}" if unknown else "flaxclf_second needs flaxclf before it")
    results = {}
    with tempfile.TemporaryDirectory(prefix="finetune_vs_torch-") as work:
        for name in [s for s in SYSTEMS if s in systems]:  # flaxclf fills the cache before flaxclf_second
            results[name] = run_system(name, a, Path(work))
            print(json.dumps(results[name]), flush=True)
    summary = {"ratios": ratios(results)}
    print(json.dumps(summary), flush=True)
    if a.out:
        with open(a.out, "a") as fh:
            for r in [*results.values(), summary]:
                fh.write(json.dumps(r) + "\n")


if __name__ == "__main__":
    main()
