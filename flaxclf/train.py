"""The fine-tuning job: set-up on a mesh, the loop (async dispatch, eval, checkpoints, preemption), export."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from jax.experimental import multihost_utils

from flaxclf import (
    assets,
    compilation,
    data,
    distributed,
    hostmem,
    losses,
    metrics,
    sharding,
    stopping,
    timing,
    weights,
)
from flaxclf.checkpoint import (
    CHECKPOINTS,
    UNREADABLE_SUFFIX,
    Checkpointer,
    CheckpointError,
    check_compatible,
    discard,
    lower_is_better,
    moved_aside,
)
from flaxclf.config import ConfigError, RunConfig
from flaxclf.data import long_text
from flaxclf.model import BertClassifier, ClassifierConfig, cast_floats, make_classifier
from flaxclf.optim import lr_schedule, make_optimizer, schedule_constants
from flaxclf.runlog import METRICS_FILE, RunLog
from flaxclf.steps import TrainState, abstract_state, compile_steps, create_state, state_shardings
from flaxclf.vocab import HF_POOLING

# What a run writes at the top of its directory; the header marks config.yaml (and so the folder) as flaxclf's.
RUN_FILES = ("config.yaml", "labels.json", METRICS_FILE, "tb", CHECKPOINTS, CHECKPOINTS + UNREADABLE_SUFFIX,
             "export", "plots", "summary.json")
CONFIG_HEADER = "# flaxclf train: the resolved settings of this run directory\n"
PREEMPTED_EXIT_CODE = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal, after a complete checkpoint


class TrainingError(RuntimeError):
    """The run can't go on (e.g. a NaN loss); the message says what to change."""


class Preempted(SystemExit):
    """Raised after a signal once the checkpoint is complete; its code is PREEMPTED_EXIT_CODE[signal]."""


class _Signals:
    """First SIGTERM/SIGINT: finish the step, save, exit. A second one exits at once."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if _main_thread():  # signal handlers can only be installed from the main thread
            for sig in PREEMPTED_EXIT_CODE:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def __exit__(self, *_):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


@dataclass
class Job:
    """Everything the loop needs, built once by setup()."""

    cfg: RunConfig
    run_dir: Path
    model_dir: Path
    mesh: jax.sharding.Mesh
    task: data.Task
    splits: dict[str, data.TokenizedSplit]
    model: BertClassifier
    batches: data.TrainBatches
    total_steps: int
    abstract: TrainState
    shardings: TrainState
    state: TrainState
    train_step: Any
    eval_step: Any
    schedule: Any
    ckpt: Checkpointer
    best: dict  # {"value", "step"} of the best validation metric so far
    loss: losses.LossSpec
    early: dict  # flaxclf.stopping's state: evaluations without improvement, and whether the run stopped


def _classifier_overrides(cfg: RunConfig, task: data.Task) -> dict:
    """The head settings applied on top of the backbone's config.json (also saved in each checkpoint)."""
    m = cfg.model
    overrides = {"num_labels": task.num_labels, "label_names": tuple(task.label_names), "pooling": m.pooling,
                 "problem_type": m.problem_type or task.problem_type}
    if m.classifier_dropout is not None:
        overrides["classifier_dropout"] = m.classifier_dropout
    return overrides


def _classifier(cfg: RunConfig, model_dir: Path, task: data.Task) -> BertClassifier:
    config: ClassifierConfig = weights.classifier_config(model_dir, cfg.model.impl, **_classifier_overrides(cfg, task))
    return make_classifier(config, dtype=jnp.dtype(cfg.model.dtype), remat=cfg.model.remat, impl=cfg.model.impl)


def _meta(job: Job) -> dict:
    """The JSON item of a checkpoint: what resume checks and continues from, and what inference rebuilds."""
    classifier = _classifier_overrides(job.cfg, job.task)
    return {"model": job.cfg.model.name, "label_names": list(job.task.label_names),
            "problem_type": job.model.config.problem_type, "data": job.batches.state(),
            "config": job.cfg.to_dict(), "best": job.best, "early_stopping": job.early,
            "loss": dataclasses.asdict(job.loss),
            "classifier": {**classifier, "label_names": list(classifier["label_names"])}}


def setup(cfg: RunConfig, clock: timing.Clock | None = None) -> Job:
    """Mesh, data, model and state (restored from the run directory when it has a checkpoint)."""
    clock = clock or timing.Clock()
    run_dir = Path(cfg.train.output_dir)
    check_output_dir(run_dir)
    with clock.phase("startup"):
        distributed.initialize(cfg.distributed)
        mesh = sharding.make_mesh(cfg.mesh)
        cache_dir = compilation.enable_configured_cache(cfg.train)
    with clock.phase("data"):
        model_dir = assets.resolve_model(cfg.model.name)
        task, splits = data.load_task(cfg.data, model_dir, train_batch_size=cfg.train.global_batch_size)
    with clock.phase("model"):
        # One process only: a multi-process executable holds collectives set up for that job's processes.
        step_cache = (compilation.StepCache(cache_dir / "steps", list(mesh.devices.flat))
                      if cache_dir is not None and jax.process_count() == 1 else None)
        return _setup_model(cfg, clock, run_dir, mesh, model_dir, task, splits, step_cache)


def _setup_model(cfg: RunConfig, clock: timing.Clock, run_dir: Path, mesh, model_dir: Path, task: data.Task,
                 splits: dict, step_cache: compilation.StepCache | None) -> Job:
    if "train" not in splits:
        raise data.DataError("there is no training split; set data.train_file or a packaged data.task")
    model = _classifier(cfg, model_dir, task)
    _check_best_metric(cfg, model.config.problem_type, "validation" in splits)
    loss = losses.resolve(cfg.loss, model.config.problem_type, task.label_names, task.train_labels)
    if cfg.data.long_text == "chunks":
        long_text.check_aggregation(model.config.problem_type, cfg.data.chunk_aggregation)
    batch_s = sharding.batch_sharding(mesh)
    batches = data.TrainBatches(splits["train"], cfg.train.global_batch_size, cfg.data.buckets, cfg.train.seed,
                                batch_s, prefetch=cfg.data.prefetch)
    total = cfg.train.max_steps or cfg.train.epochs * batches.steps_per_epoch
    tx = make_optimizer(cfg.optim, total)
    abstract = abstract_state(model, tx, jnp.dtype(cfg.model.param_dtype))
    shardings = state_shardings(abstract, mesh)
    if cfg.checkpoint.fresh and jax.process_index() == 0:
        discard(run_dir)
    multihost_utils.sync_global_devices("flaxclf:fresh")
    ckpt = Checkpointer(run_dir / CHECKPOINTS, cfg.checkpoint, f"validation/{cfg.train.best_metric}")
    jitted_train, jitted_eval = compile_steps(model, tx, loss, cfg.optim.grad_accum_steps, mesh, shardings)
    evals = {split: data.eval_lengths(splits[split], cfg.train.eval_batch_size, cfg.data.buckets, batch_s)
             for split in ("validation", "test") if split in splits}
    pool = compilation.pool(len(batches.bucket_lengths) + len({n for ns in evals.values() for n in ns}))
    try:
        # The evaluation shapes compile while the checkpoint is read and the weights load.
        params_s = compilation.structs(abstract.params, shardings.params)
        eval_step = compilation.Precompiled(jitted_eval, pool, step_cache, repr(("eval", model, mesh))).start(
            (params_s, data.batch_structs(splits[split], cfg.train.eval_batch_size, n, batch_s, evaluation=True))
            for split, lengths in evals.items() for n in lengths)
        restored = _restore(ckpt, abstract, shardings, cfg, task, run_dir)
        best, early = {"value": None, "step": None}, stopping.initial()
        if restored is not None:
            state, meta = restored
            batches.restore(meta["data"])
            best = meta.get("best", best)
            early = meta.get("early_stopping", early)
        # All that train_step closes over; of the run's length, only what the schedule holds as constants.
        settings = ("train", model, cfg.optim, schedule_constants(cfg.optim, total), loss, mesh)
        train_step = compilation.Precompiled(jitted_train, pool, step_cache, repr(settings))
        start = 0 if restored is None else int(jax.device_get(state.step))
        if not early["stopped"]:
            state_s = compilation.structs(abstract, shardings)
            train_step.start((state_s, data.batch_structs(splits["train"], cfg.train.global_batch_size, n, batch_s))
                             for n in batches.lengths(total - start))
        if restored is None:
            host = weights.load_params(model, model_dir, jax.random.PRNGKey(cfg.train.seed))
            host = cast_floats(host, jnp.dtype(cfg.model.param_dtype))
            state = create_state(host, tx, shardings, cfg.train.seed)
        with clock.phase("compile"):
            eval_step.wait()
            train_step.wait()
    except BaseException:
        ckpt.close()  # a refused run must not leave orbax's threads to fail (and print) at interpreter exit
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return Job(cfg, run_dir, model_dir, mesh, task, splits, model, batches, total, abstract, shardings, state,
               train_step, eval_step, lr_schedule(cfg.optim, total), ckpt, best, loss, early)


def _check_best_metric(cfg: RunConfig, problem_type: str, has_validation: bool) -> None:
    """train.best_metric must be a number the validation reports; checked before any step is spent."""
    names = metrics.SCALARS[problem_type]
    if has_validation and cfg.train.best_metric not in names:
        raise ConfigError(f"train.best_metric {cfg.train.best_metric!r} is not a validation metric of "
                          f"{problem_type}; use one of {', '.join(names)}")
    if cfg.train.early_stopping_patience is not None and not has_validation:
        raise ConfigError("train.early_stopping_patience watches the validation split, and this data has none; "
                          "set data.validation_file or train.early_stopping_patience=null")


def _restore(ckpt: Checkpointer, abstract, shardings, cfg: RunConfig, task: data.Task, run_dir: Path):
    """(state, meta) of the run directory's newest readable checkpoint after checking that it fits this run;
    None for a directory without checkpoints. Never silently starts over where checkpoints were."""
    aside = run_dir / (CHECKPOINTS + UNREADABLE_SUFFIX)
    if not ckpt.steps():
        if steps_aside := moved_aside(run_dir):
            raise CheckpointError(f"{run_dir} has no readable checkpoint left (unreadable ones, steps "
                                  f"{', '.join(steps_aside)}, were moved to {aside}); set "
                                  "checkpoint.fresh=true to start over, or use another train.output_dir")
        return None
    out = ckpt.restore(abstract, shardings,
                       check=lambda meta: check_compatible(meta, cfg, task.label_names, run_dir))
    if out is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory} could be read (they were moved to {aside}); "
                              "set checkpoint.fresh=true to start over, or use another train.output_dir")
    return out[1], out[2]


def evaluate(job: Job, params: Any, split: str) -> dict:
    """Metrics over every example of a split exactly once (padding rows have weight 0), on any mesh."""
    batch_s = sharding.batch_sharding(job.mesh)
    tokenized = job.splits[split]
    out = {"logits": [], "labels": [], "weight": [], "row": []}
    for batch in data.eval_batches(tokenized, job.cfg.train.eval_batch_size, job.cfg.data.buckets,
                                   batch_s, prefetch=job.cfg.data.prefetch):
        logits = job.eval_step(params, batch)
        for k, v in (("logits", logits), ("labels", batch["labels"]), ("weight", batch["weight"]),
                     ("row", batch["row"])):
            out[k].append(sharding.to_host(v))
    cat = {k: np.concatenate(v) for k, v in out.items()}
    problem_type = job.model.config.problem_type
    if tokenized.chunked:  # one prediction per text: its windows' outputs combined, every text counted once
        keep = cat["weight"] > 0
        _, z, first = long_text.aggregate(problem_type, job.cfg.data.chunk_aggregation, cat["logits"][keep],
                                          cat["row"][keep])
        return metrics.compute_metrics(problem_type, z, cat["labels"][keep][first], None, job.task.label_names)
    return metrics.compute_metrics(problem_type, cat["logits"], cat["labels"], cat["weight"], job.task.label_names)


def check_output_dir(run_dir: Path) -> None:
    """A run writes into a new folder, its own run directory, or a folder where none of its file names exist:
    it never overwrites a file it did not write."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir} is a file; name a folder for the run")
    config = run_dir / "config.yaml"
    if (run_dir / CHECKPOINTS).is_dir() or (config.is_file() and
                                            config.read_text(errors="replace").startswith(CONFIG_HEADER)):
        return  # a run directory (checkpoints are checked against this run before they are used)
    clash = [name for name in RUN_FILES if (run_dir / name).exists()]
    if clash:
        raise ConfigError(f"train.output_dir {run_dir} holds {', '.join(clash)}, which flaxclf did not write; use "
                          "another train.output_dir (a new folder, or a flaxclf run directory)")


def _write_run_files(job: Job) -> None:
    if jax.process_index() != 0:
        return
    job.run_dir.mkdir(parents=True, exist_ok=True)
    (job.run_dir / "config.yaml").write_text(CONFIG_HEADER + yaml.safe_dump(job.cfg.to_dict(), sort_keys=False))
    labels = {"problem_type": job.model.config.problem_type, "id2label": job.model.config.id2label,
              "loss": dataclasses.asdict(job.loss)}
    (job.run_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


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


def train_loop(job: Job, log: RunLog, signals: _Signals, clock: timing.Clock) -> None:
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
            stop = _any_process(signals.received is not None, step, cfg.train.log_every)
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
                job.ckpt.save(step, job.state, _meta(job), step_metrics)
        if stop:
            job.ckpt.save(step, job.state, _meta(job), step_metrics)
            job.ckpt.wait()
            sig = signals.received or signal.SIGTERM
            log.say(f"stopped by signal {sig} after step {step}; checkpoint {step} is complete; exiting with "
                    f"code {PREEMPTED_EXIT_CODE[sig]}")
            log.close()
            raise Preempted(PREEMPTED_EXIT_CODE[sig])
    if pending is not None:
        with clock.phase("train"):
            window.add(*pending)


def _any_process(local: bool, step: int, every: int) -> bool:
    """Whether any process received a stop signal. With several processes they agree every `every` steps
    (a collective each step would stall async dispatch); one process answers at once."""
    if jax.process_count() == 1:
        return local
    if step % every:
        return False
    return bool(multihost_utils.process_allgather(np.array(local)).any())


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


def finish(job: Job, log: RunLog, clock: timing.Clock | None = None) -> dict:
    """Waits for checkpoints, exports the best (or final) model in the HF format, evaluates it on test."""
    clock = clock or timing.Clock()
    with clock.phase("checkpoint"):
        job.ckpt.wait()
        params, which = job.state.params, "final"
        best_step = job.ckpt.best_step()
        if job.cfg.train.export == "best" and best_step is not None and best_step != int(job.state.step):
            params = job.ckpt.restore_params(best_step, job.abstract.params, job.shardings.params)
            which = f"best (step {best_step})"
    summary = {"run_dir": str(job.run_dir), "exported": which, "best": job.best, "steps": int(job.state.step),
               "early_stopped": job.early["stopped"], "loss": dataclasses.asdict(job.loss), "warnings": []}
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
            if job.model.config.pooling == HF_POOLING:
                summary["export_dir"] = str(weights.export_hf(job.run_dir / "export", job.model.config, host,
                                                             job.model_dir))
            else:
                log.say(f"no HF export: pooling={job.model.config.pooling!r} has no PyTorch equivalent")
            (job.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _heap_cap(job: Job) -> hostmem.HeapCap | None:
    """The kept heap's cap (flaxclf.hostmem.HeapCap), where the flaxclf command keeps freed memory: the GB
    train.host_memory_cap_gb says, or by default what the process holds once the steps are compiled plus 1.25
    times the largest step's temporaries (one step's working set, with room for the batches around it)."""
    gb = job.cfg.train.host_memory_cap_gb
    if gb is not None:
        return hostmem.cap_heap(int(gb * 1e9))
    return hostmem.cap_heap_at_working_set(max(job.train_step.temp_bytes(), job.eval_step.temp_bytes()))


def run(cfg: RunConfig, show_progress: bool = True, clock: timing.Clock | None = None) -> dict:
    """The whole job; returns the summary (also written to <output_dir>/summary.json) with its time breakdown
    (flaxclf.timing) measured from the Clock given, or from this call."""
    clock = clock or timing.Clock()
    job = setup(cfg, clock)
    with clock.phase("startup"):  # the run's files and logs (tensorboard's writer) are part of starting
        _write_run_files(job)
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
    cap = _heap_cap(job)
    if cap is not None:
        log.say(f"host memory: freed memory kept for reuse, given back above {cap.limit / 1e9:.2f} GB resident "
                "(train.host_memory_cap_gb)")
    try:
        with _Signals() as signals:
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
        summary["host_memory"] = {"cap_gb": round(cap.limit / 1e9, 3), "trims": cap.trims}
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
    """PNGs under <run_dir>/plots (flaxclf.plots); a failure to draw is reported, never fatal to a finished run."""
    from flaxclf import plots

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
    lines.append(f"  next: flaxclf evaluate {d} --data FILE; flaxclf predict {d} FILE; flaxclf inspect {d}")
    return "\n".join(lines)
