"""The fine-tuning loop: async dispatch, evaluation, best-model and early-stopping tracking, checkpoints and
preemption; then the export of the best model and the end-of-run summary."""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from flaxclf import data
from flaxclf.config import RunConfig
from flaxclf.data import long_text
from flaxclf.data.packing import per_text
from flaxclf.hf import peft, weights
from flaxclf.nn import lora
from flaxclf.options import HF_POOLING
from flaxclf.runtime import sharding, timing
from flaxclf.training import losses, metrics, plots, rundir, stopping
from flaxclf.training.checkpoint import lower_is_better
from flaxclf.training.job import Job, heap_cap, meta, setup
from flaxclf.training.metrics_log import RunLog
from flaxclf.training.preemption import PREEMPTED_EXIT_CODE, Preempted, Signals, any_process
from flaxclf.training.steps import saved


class TrainingError(RuntimeError):
    """The run can't go on (e.g. a NaN loss); the message says what to change."""


def evaluate(job: Job, params: Any, split: str) -> dict:
    """Metrics over every example of a split exactly once (padding rows have weight 0), on any mesh."""
    batch_s = sharding.batch_sharding(job.mesh)
    tokenized = job.splits[split]
    out = {"logits": [], "labels": [], "weight": [], "row": []}
    for batch in data.eval_batches(tokenized, job.cfg.train.eval_batch_size, job.cfg.data.buckets,
                                   batch_s, prefetch=job.cfg.data.prefetch, packed=job.cfg.data.packing == "on"):
        out["logits"].append(sharding.to_host(job.eval_step(params, batch)))
        for k in ("labels", "weight", "row"):  # one entry per text slot, as the logits
            out[k].append(per_text(sharding.to_host(batch[k]), batch))
    cat = {k: np.concatenate(v) for k, v in out.items()}
    problem_type = job.model.config.problem_type
    if tokenized.chunked:  # one prediction per text: its windows' outputs combined, every text counted once
        keep = cat["weight"] > 0
        _, z, first = long_text.aggregate(problem_type, job.cfg.data.chunk_aggregation, cat["logits"][keep],
                                          cat["row"][keep])
        return metrics.compute_metrics(problem_type, z, cat["labels"][keep][first], None, job.task.label_names)
    return metrics.compute_metrics(problem_type, cat["logits"], cat["labels"], cat["weight"], job.task.label_names)


class _Window:
    """Train metrics since the last log line, pulled to the host one step behind the dispatch."""

    def __init__(self):
        self.loss, self.steps, self.examples, self.grad_norm = 0.0, 0, 0.0, 0.0
        self.t0 = time.perf_counter()

    def add(self, step: int, m: dict) -> None:
        m = jax.device_get(m)
        if not math.isfinite(float(m["loss"])):
            raise TrainingError(f"the training loss is {float(m['loss'])} at step {step}; lower "
                                "optim.learning_rate, keep optim.max_grad_norm set, or use model.dtype=float32")
        self.loss += float(m["loss"])
        self.grad_norm = float(m["grad_norm"])
        self.examples += float(m["examples"])
        self.steps += 1

    def record(self, step: int, lr: float, epoch: float) -> dict:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        return {"step": step, "split": "train", "epoch": round(epoch, 4), "loss": self.loss / max(self.steps, 1),
                "grad_norm": self.grad_norm, "lr": lr, "examples_per_s": self.examples / dt}


def _eval_due(job: Job, step: int) -> bool:
    every = job.cfg.train.eval_every or job.batches.steps_per_epoch
    return step % every == 0 or step == job.total_steps


def train_loop(job: Job, log: RunLog, signals: Signals, clock: timing.Clock) -> None:
    """Steps until total_steps: dispatch step n+1 before pulling step n's metrics to the host. The train phase
    ends when the step's metrics are on the host, so its time is not counted as evaluation or saving."""
    cfg, step = job.cfg, int(jax.device_get(job.state.step))
    window, pending = _Window(), None
    while step < job.total_steps and not job.early["stopped"]:
        with clock.phase("train"):
            batch = next(job.batches)
            job.state, m = job.train_step(job.state, batch)
            step += 1
            if pending is not None:
                window.add(*pending)
            pending = (step, m)
            eval_now, save_now = _eval_due(job, step), job.ckpt.due(step)
            stop = any_process(signals.received is not None, step, cfg.train.log_every)
            if step % cfg.train.log_every == 0 or eval_now or save_now or stop or step == job.total_steps:
                window.add(*pending)
                pending = None
                record = window.record(step, float(job.schedule(step - 1)), step / job.batches.steps_per_epoch)
                log.write(record)
                log.progress(step, loss=record["loss"], ex_per_s=record["examples_per_s"])
                window = _Window()
        step_metrics = None
        if eval_now and "validation" in job.splits:
            with clock.phase("evaluate"):
                result = evaluate(job, job.state.params, "validation")
            log.write({"step": step, "split": "validation", **result})
            shown = {k: round(v, 4) for k, v in metrics.scalars(result).items() if k != "count"}
            log.say(f"step {step} validation: {shown}")
            step_metrics = _track_best(job, step, result)
            window = _Window()  # examples/s counts training time only
        if job.early["stopped"]:
            log.say(f"early stopping at step {step}: validation {cfg.train.best_metric} has not improved by more "
                    f"than {cfg.train.early_stopping_min_delta} for {job.early['bad_evals']} evaluations (best "
                    f"{job.best['value']:.4f} at step {job.best['step']})")
        if step_metrics is not None or save_now or step == job.total_steps or job.early["stopped"]:
            with clock.phase("checkpoint"):
                job.ckpt.save(step, saved(job.state, job.model), meta(job), step_metrics)
        if stop:
            job.ckpt.save(step, saved(job.state, job.model), meta(job), step_metrics)
            job.ckpt.wait()
            sig = signals.received or signal.SIGTERM
            log.say(f"stopped by signal {sig} after step {step}; checkpoint {step} is complete; exiting with "
                    f"code {PREEMPTED_EXIT_CODE[sig]}")
            log.close()
            raise Preempted(PREEMPTED_EXIT_CODE[sig])
    if pending is not None:
        with clock.phase("train"):
            window.add(*pending)


def _track_best(job: Job, step: int, result: dict) -> dict | None:
    name = job.cfg.train.best_metric
    value = metrics.scalars(result).get(name)
    if value is None:
        raise TrainingError(f"train.best_metric {name!r} is not among the validation metrics "
                            f"{sorted(metrics.scalars(result))}; pick one of them")
    t = job.cfg.train
    job.early = stopping.update(job.early, value, job.best["value"], lower_is_better=lower_is_better(name),
                                min_delta=t.early_stopping_min_delta, patience=t.early_stopping_patience)
    # Ties go to the later step, as orbax's BestN keeps the later of equal scores: the two must agree.
    better = job.best["value"] is None or (
        value <= job.best["value"] if lower_is_better(name) else value >= job.best["value"])
    if better:
        job.best = {"value": value, "step": step}
    return {f"validation/{name}": value}


def _batch_figures(job: Job) -> dict:
    """How the training texts were batched: tokens computed per text against the texts' own, and the shapes."""
    b = job.batches
    return {"packing": job.cfg.data.packing, "train_shapes": [list(s) for s in job.train_step.shapes()],
            "tokens_per_text": round(b.padded_tokens(job.total_steps), 2),
            "real_tokens_per_text": round(float(b.split.lengths.mean()) if len(b.split) else 0.0, 2)}


def finish(job: Job, log: RunLog, clock: timing.Clock | None = None) -> dict:
    """Waits for checkpoints, exports the best (or final) model in the HF format, evaluates it on test."""
    clock = clock or timing.Clock()
    with clock.phase("checkpoint"):
        job.ckpt.wait()
        params, which = job.state.params, "final"
        best_step = job.ckpt.best_step()
        if job.cfg.train.export == "best" and best_step is not None and best_step != int(job.state.step):
            trained = job.ckpt.restore_params(best_step, saved(job.abstract, job.model).params,
                                              saved(job.shardings, job.model).params)
            params = lora.merge(trained, lora.split(job.state.params, job.model.config.lora)[1])
            which = f"best (step {best_step})"
    summary = {"run_dir": str(job.run_dir), "exported": which, "best": job.best, "steps": int(job.state.step),
               "early_stopped": job.early["stopped"], "loss": dataclasses.asdict(job.loss), "warnings": [],
               "batches": _batch_figures(job)}
    for split in ("validation", "test"):
        if split in job.splits:
            with clock.phase("evaluate"):
                result = evaluate(job, params, split)
            summary[split] = metrics.scalars(result)
            if warning := metrics.learns_nothing(result, job.task.label_names):
                summary["warnings"].append(f"{split}: {warning}")
            log.write({"step": int(job.state.step), "split": f"{split}_{which.split()[0]}", **result})
    with clock.phase("export"):
        host = jax.tree.map(sharding.to_host, params)
        if jax.process_index() == 0:
            config, spec = job.model.config, job.model.config.lora
            if config.pooling == HF_POOLING and spec is not None:
                summary["adapter_dir"] = str(peft.export_adapter(job.run_dir / "adapter", config, host,
                                                                 peft.base_reference(job.cfg.model.name,
                                                                                     job.model_dir)))
            if config.pooling == HF_POOLING:
                summary["export_dir"] = str(weights.export_hf(job.run_dir / "export", config.replace(lora=None),
                                                             lora.merged(host, spec), job.model_dir))
            else:
                log.say(f"no HF export: pooling={job.model.config.pooling!r} has no PyTorch equivalent")
            (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def run(cfg: RunConfig, show_progress: bool = True, clock: timing.Clock | None = None) -> dict:
    """The whole job; returns the summary (also written to <output_dir>/summary.json) with its time breakdown
    (flaxclf.runtime.timing) measured from the Clock given, or from this call."""
    clock = clock or timing.Clock()
    job = setup(cfg, clock)
    with clock.phase("startup"):  # the run's files and logs (tensorboard's writer) are part of starting
        rundir.write_run_files(job.run_dir, cfg, job.model.config.problem_type, job.model.config.id2label,
                               job.loss)
        start = int(jax.device_get(job.state.step))
        log = RunLog(job.run_dir, job.total_steps, start, show_progress)
    if job.early["stopped"]:
        log.say(f"the run in {job.run_dir} stopped early at step {start} (train.early_stopping_patience); "
                "nothing left to train: exporting its best model again")
    elif start:
        log.say(f"resumed from {job.ckpt.directory / str(start)} at step {start} of {job.total_steps}")
    else:
        log.say(f"training {job.total_steps} steps from step 0 into {job.run_dir}")
    if note := losses.describe(job.loss, job.task.label_names):
        log.say(note)
    cap = heap_cap(job)
    if cap is not None:
        log.say(f"host memory: freed memory kept for reuse, given back above {cap.limit / 1e9:.2f} GB resident "
                "(train.host_memory_cap_gb)")
    try:
        with Signals() as signals:
            train_loop(job, log, signals, clock)
        log.end_progress()  # the bar's last state once, then the end of the run as plain lines
        summary = finish(job, log, clock)
    except BaseException:
        # tensorboardX's writer thread, left open, fails (and prints) at interpreter exit on Python 3.12.
        log.close()
        raise
    finally:
        if cap is not None:
            cap.stop()
        with clock.phase("checkpoint"):  # orbax's close waits for its threads
            job.batches.close()
            job.ckpt.close()
    if cap is not None:
        summary["host_memory"] = {"cap_gb": round(cap.start_limit / 1e9, 3), "trims": cap.trims,
                                  "raises": cap.raises, "final_cap_gb": round(cap.limit / 1e9, 3)}
    if jax.process_index() == 0:
        with clock.phase("plots"):
            summary["plots"] = _draw_plots(job.run_dir, log)
    summary["time"] = clock.breakdown()
    summary["wall_s"] = summary["time"]["wall_s"]
    log.say(_summary_text(summary, cfg.train.best_metric))
    log.close()
    if jax.process_index() == 0:
        (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _draw_plots(run_dir: Path, log: RunLog) -> list[str]:
    """PNGs under <run_dir>/plots (flaxclf.training.plots); a failure to draw is reported, never fatal to a
    finished run."""
    try:
        return [str(p) for p in plots.write_plots(run_dir)]
    except Exception as e:  # a plotting problem must not cost the trained model
        log.say(f"could not draw the plots ({type(e).__name__}: {e}); the numbers are in metrics.jsonl")
        return []


_SHOWN = ("accuracy", "macro_f1", "micro_f1", "mse", "pearson")


def _summary_text(s: dict, best_metric: str) -> str:
    """The end-of-run summary: the best metric, the final scores, and where each output is."""
    d = s["run_dir"]
    best = s.get("best") or {}
    early = " (stopped early: train.early_stopping_patience)" if s.get("early_stopped") else ""
    lines = [f"done: {s['steps']} steps in {s['wall_s']:.0f} s{early}"]
    if "time" in s:
        lines.append(f"  {timing.describe(s['time'])}")
    if best.get("value") is not None:
        lines.append(f"  best validation {best_metric}: {best['value']:.4f} at step {best['step']}")
    for split in ("validation", "test"):
        if split in s:
            shown = ", ".join(f"{k} {v:.4f}" for k, v in s[split].items() if k in _SHOWN)
            lines.append(f"  {split} ({s['exported']} model): {shown}")
    lines += [f"  warning: {w}" for w in s.get("warnings", [])]
    lines.append(f"  run directory {d}/")
    lines.append("    config.yaml, labels.json  the resolved config and the label map")
    lines.append(f"    metrics.jsonl, tb/        every logged number (tensorboard --logdir {d}/tb)")
    if s.get("plots"):
        lines.append(f"    plots/                    {', '.join(Path(p).name for p in s['plots'])}")
    lines.append("    checkpoints/              run the same command again to resume")
    if s.get("export_dir"):
        lines.append(f"    export/                   the {s['exported']} model as a Hugging Face folder "
                     "(AutoModelForSequenceClassification.from_pretrained)")
    if s.get("adapter_dir"):
        lines.append(f"    adapter/                  the {s['exported']} model's LoRA adapter as peft's folder "
                     "(PeftModel.from_pretrained)")
    lines.append(f"  next: flaxclf evaluate {d} --data FILE; flaxclf predict {d} FILE; flaxclf inspect {d}")
    return "\n".join(lines)
