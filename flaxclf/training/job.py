"""A training job's set-up: mesh, data, model, optimizer, sharded state (fresh or restored from the run
directory), and the compiled steps; and what each checkpoint records of it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from flaxclf import assets, data
from flaxclf.config import ConfigError, RunConfig
from flaxclf.data import long_text
from flaxclf.hf import config as hf_config
from flaxclf.hf import peft, weights
from flaxclf.models.classifier import ClassifierConfig, cast_floats, make_classifier
from flaxclf.models.interface import Classifier
from flaxclf.runtime import compilation, distributed, hostmem, sharding, timing
from flaxclf.training import losses, metrics, rundir, stopping
from flaxclf.training.checkpoint import CHECKPOINTS, UNREADABLE_SUFFIX, Checkpointer, CheckpointError, check_compatible
from flaxclf.training.optim import lr_schedule, make_optimizer, schedule_constants
from flaxclf.training.steps import (
    TrainState,
    abstract_state,
    compile_steps,
    create_state,
    place_frozen,
    saved,
    state_shardings,
    with_frozen,
)


@dataclass
class Job:
    """Everything the loop needs, built once by setup()."""

    cfg: RunConfig
    run_dir: Path
    model_dir: Path
    mesh: jax.sharding.Mesh
    task: data.Task
    splits: dict[str, data.TokenizedSplit]
    model: Classifier
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
    early: dict  # flaxclf.training.stopping's state: evaluations without improvement, and whether the run stopped
    base_sha256: str | None = None  # a LoRA run's base weights (flaxclf.hf.weights.checkpoint_sha256)


def classifier_overrides(cfg: RunConfig, task: data.Task) -> dict:
    """The head settings applied on top of the backbone's config.json (also saved in each checkpoint)."""
    m = cfg.model
    overrides = {"num_labels": task.num_labels, "label_names": tuple(task.label_names), "pooling": m.pooling,
                 "problem_type": m.problem_type or task.problem_type}
    if m.classifier_dropout is not None:
        overrides["classifier_dropout"] = m.classifier_dropout
    return overrides


def _classifier(cfg: RunConfig, model_dir: Path, task: data.Task) -> Classifier:
    config: ClassifierConfig = weights.classifier_config(model_dir, cfg.model.impl, **classifier_overrides(cfg, task))
    return make_classifier(config, dtype=jnp.dtype(cfg.model.dtype), remat=cfg.model.remat, impl=cfg.model.impl)


def meta(job: Job) -> dict:
    """The JSON item of a checkpoint: what resume checks and continues from, and what inference rebuilds."""
    classifier = classifier_overrides(job.cfg, job.task)
    return {"model": job.cfg.model.name, "label_names": list(job.task.label_names),
            "problem_type": job.model.config.problem_type, "data": job.batches.state(),
            "config": job.cfg.to_dict(), "best": job.best, "early_stopping": job.early,
            "loss": dataclasses.asdict(job.loss),
            "classifier": {**classifier, "label_names": list(classifier["label_names"])},
            **_lora_meta(job.model, job.base_sha256)}


def _lora_meta(model: Classifier, base_sha256: str | None) -> dict:
    """A LoRA run's adapter (its layers and what else it trains) and the hash of the base it adapts; nothing
    without LoRA."""
    spec = model.config.lora
    return {} if spec is None else {"lora": spec.to_json(), "base_sha256": base_sha256}


def setup(cfg: RunConfig, clock: timing.Clock | None = None) -> Job:
    """Mesh, data, model and state (restored from the run directory when it has a checkpoint)."""
    clock = clock or timing.Clock()
    run_dir = Path(cfg.train.output_dir)
    rundir.check_output_dir(run_dir)
    with clock.phase("startup"):
        distributed.initialize(cfg.distributed)
        mesh = sharding.make_mesh(cfg.mesh)
        cache_dir = compilation.enable_configured_cache(cfg.train)
    with clock.phase("data"):
        model_dir = assets.resolve_model(cfg.model.name)
        task, splits = data.load_task(cfg.data, model_dir, train_batch_size=cfg.train.global_batch_size,
                                      max_positions=hf_config.max_positions(model_dir))
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
    host, base_sha256 = None, None
    if cfg.model.lora.rank is not None:
        # The base's weights come first: the adapter trains the head modules the base lacks, and a resumed run
        # takes its frozen weights from them.
        model = peft.with_lora(model, cfg.model.lora)  # its targets and rank checked before anything is read
        host, new_head = weights.load_base(model, model_dir, jax.random.PRNGKey(cfg.train.seed), report=False)
        model = peft.with_new_head(model, new_head)
        base_sha256 = weights.checkpoint_sha256(model_dir)
    _check_best_metric(cfg, model.config.problem_type, "validation" in splits)
    loss = losses.resolve(cfg.loss, model.config.problem_type, task.label_names, task.train_labels)
    if cfg.data.long_text == "chunks":
        long_text.check_aggregation(model.config.problem_type, cfg.data.chunk_aggregation)
    packed = cfg.data.packing == "on"
    batch_s = sharding.batch_sharding(mesh)
    batches = data.TrainBatches(splits["train"], cfg.train.global_batch_size, cfg.data.buckets, cfg.train.seed,
                                batch_s, prefetch=cfg.data.prefetch,
                                packing_shapes=cfg.data.packing_shapes if packed else None)
    total = cfg.train.max_steps or cfg.train.epochs * batches.steps_per_epoch
    if packed:
        batches.plan_packing(total, cfg.optim.grad_accum_steps)
    tx = make_optimizer(cfg.optim, total, model.config.encoder.decays)
    abstract = abstract_state(model, tx, jnp.dtype(cfg.model.param_dtype))
    shardings = state_shardings(abstract, mesh, model)
    if cfg.checkpoint.fresh and jax.process_index() == 0:
        rundir.discard(run_dir)
    multihost_utils.sync_global_devices("flaxclf:fresh")
    ckpt = Checkpointer(run_dir / CHECKPOINTS, cfg.checkpoint, f"validation/{cfg.train.best_metric}")
    jitted_train, jitted_eval = compile_steps(model, tx, loss, cfg.optim.grad_accum_steps, mesh, shardings)
    evals = [s for split in ("validation", "test") if split in splits
             for s in data.eval_structs(splits[split], cfg.train.eval_batch_size, cfg.data.buckets, batch_s, packed)]
    pool = compilation.pool(len(batches.lengths(total)) + len(evals))
    try:
        # The evaluation shapes compile while the checkpoint is read and the weights load.
        params_s = compilation.structs(abstract.params, shardings.params)
        eval_step = compilation.Precompiled(jitted_eval, pool, step_cache, repr(("eval", model, mesh))).start(
            (params_s, structs) for structs in evals)
        if host is not None:
            host = cast_floats(host, jnp.dtype(cfg.model.param_dtype))
        restored = _restore(ckpt, saved(abstract, model), saved(shardings, model), cfg, task, run_dir, base_sha256)
        best, early = {"value": None, "step": None}, stopping.initial()
        if restored is not None:
            state, meta = restored
            state = with_frozen(state, place_frozen(host, shardings.params, model.config.lora))
            batches.restore(meta["data"])
            best = meta.get("best", best)
            early = meta.get("early_stopping", early)
        # All that train_step closes over; of the run's length, only what the schedule holds as constants.
        settings = ("train", model, cfg.optim, schedule_constants(cfg.optim, total), loss, mesh)
        train_step = compilation.Precompiled(jitted_train, pool, step_cache, repr(settings))
        start = 0 if restored is None else int(jax.device_get(state.step))
        if not early["stopped"]:
            state_s = compilation.structs(abstract, shardings)
            train_step.start((state_s, structs) for structs in batches.structs(total - start))
        if restored is None:
            if base_sha256 is not None:  # a LoRA run: its base was read quietly, before it was known to start
                weights.report_fresh_head(new_head)
            if host is None:
                host = weights.load_params(model, model_dir, jax.random.PRNGKey(cfg.train.seed))
                host = cast_floats(host, jnp.dtype(cfg.model.param_dtype))
            state = create_state(host, tx, shardings, cfg.train.seed, model.config.lora)
        with clock.phase("compile"):
            eval_step.wait()
            train_step.wait()
    except BaseException:
        ckpt.close()  # a refused run must not leave orbax's threads to fail (and print) at interpreter exit
        raise
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    return Job(cfg, run_dir, model_dir, mesh, task, splits, model, batches, total, abstract, shardings, state,
               train_step, eval_step, lr_schedule(cfg.optim, total), ckpt, best, loss, early, base_sha256)


def _check_best_metric(cfg: RunConfig, problem_type: str, has_validation: bool) -> None:
    """train.best_metric must be a number the validation reports; checked before any step is spent."""
    names = metrics.SCALARS[problem_type]
    if has_validation and cfg.train.best_metric not in names:
        raise ConfigError(f"train.best_metric {cfg.train.best_metric!r} is not a validation metric of "
                          f"{problem_type}; use one of {', '.join(names)}")
    if cfg.train.early_stopping_patience is not None and not has_validation:
        raise ConfigError("train.early_stopping_patience watches the validation split, and this data has none; "
                          "set data.validation_file or train.early_stopping_patience=null")


def _restore(ckpt: Checkpointer, abstract, shardings, cfg: RunConfig, task: data.Task, run_dir: Path,
             base_sha256: str | None):
    """(state, meta) of the run directory's newest readable checkpoint after checking that it fits this run;
    None for a directory without checkpoints. Never silently starts over where checkpoints were."""
    aside = run_dir / (CHECKPOINTS + UNREADABLE_SUFFIX)
    if not ckpt.steps():
        if steps_aside := rundir.moved_aside(run_dir):
            raise CheckpointError(f"{run_dir} has no readable checkpoint left (unreadable ones, steps "
                                  f"{', '.join(steps_aside)}, were moved to {aside}); set "
                                  "checkpoint.fresh=true to start over, or use another train.output_dir")
        return None
    out = ckpt.restore(abstract, shardings,
                       check=lambda meta: check_compatible(meta, cfg, task.label_names, run_dir, base_sha256))
    if out is None:
        raise CheckpointError(f"no checkpoint in {ckpt.directory} could be read (they were moved to {aside}); "
                              "set checkpoint.fresh=true to start over, or use another train.output_dir")
    return out[1], out[2]


def heap_cap(job: Job) -> hostmem.HeapCap | None:
    """The kept heap's cap (flaxclf.runtime.hostmem.HeapCap), where the flaxclf command keeps freed memory: the GB
    train.host_memory_cap_gb says, or by default what the process holds once the steps are compiled plus 1.25
    times the largest step's temporaries (one step's working set, with room for the batches around it)."""
    gb = job.cfg.train.host_memory_cap_gb
    if gb is not None:
        return hostmem.cap_heap(int(gb * 1e9))
    return hostmem.cap_heap_at_working_set(max(job.train_step.temp_bytes(), job.eval_step.temp_bytes()))
