"""Orbax checkpoints of the train state: keep policy, sharded restore onto any mesh, params-only restore, and
the resume policy (which settings a resumed run must keep)."""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flaxclf.config import CheckpointConfig, RunConfig
from flaxclf.runtime import sharding

log = logging.getLogger("flaxclf")

LOWER_IS_BETTER = ("loss", "mse")
CHECKPOINTS = "checkpoints"  # the folder under a run directory
UNREADABLE_SUFFIX = ".unreadable"  # sibling folder where unreadable checkpoints are moved (never deleted)


class CheckpointError(ValueError):
    """A run directory whose checkpoints can't be used for this run; the message says what to do."""


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in LOWER_IS_BETTER


def sharded_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the *new* mesh's shardings: orbax then restores onto that layout (without
    them it silently restores the saved layout, and NamedTuples come back as lists)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def _flat_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """'a/b/c' -> shape of every array leaf of a state, abstract state or orbax metadata tree."""
    leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {sharding.path_str(p): tuple(x.shape) for p, x in leaves if hasattr(x, "shape")}


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"


class Checkpointer:
    """Saves every `every_steps` steps, on demand (end, eval, preemption); keeps the last `keep` and the best
    by `best_metric`. Items: "state" (arrays, written by every process) and "meta" (JSON)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, best_metric: str, read_only: bool = False):
        self.directory = Path(directory).absolute()
        self.cfg, self.best_metric, self.read_only = cfg, best_metric, read_only
        reverse = lower_is_better(best_metric)
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=cfg.keep),
            pp.BestN(get_metric_fn=self._metric, reverse=reverse, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=cfg.async_save, create=not read_only,
            # Orbax writes the metrics (and ranks by them) only when best_fn is set; the policy above decides
            # what is kept.
            best_fn=self._metric, best_mode="min" if reverse else "max",
            # Leftovers of saves that never finished (a killed process) are not checkpoints.
            cleanup_tmp_directories=not read_only, read_only=read_only,
            # Interval saves are decided by the loop (orbax's own interval would also save step 1).
            save_decision_policy=None)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def _metric(self, metrics: dict) -> float:
        return float(metrics[self.best_metric])

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts an asynchronous save; it blocks only for the device-to-host copy."""
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def steps(self) -> list[int]:
        """Complete checkpoints, oldest first (a save still in flight or torn by a crash is not listed)."""
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract: Any, shardings: Any,
                check: Callable[[dict], None] | None = None) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, restored onto `shardings`. `check(meta)` may
        refuse the run directory (it raises) before anything is read or moved. A checkpoint whose saved arrays
        have other shapes than `abstract` is refused, never called unreadable; only one that can't be read is
        skipped with a warning and moved aside, so that this run can save that step again. None when there is
        no checkpoint."""
        target = sharded_target(abstract, shardings)
        unreadable = []
        for step in reversed(self.steps()):
            try:
                meta = self.read_meta(step)
            except Exception as e:  # a torn or corrupted write: fall back to the one before
                unreadable.append(self.skip(step, e))
                continue
            if check is not None:
                check(meta)
            try:
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target)))["state"]
            except Exception as e:
                mismatch = self._shape_mismatch(step, abstract)
                if mismatch is not None:
                    raise CheckpointError(f"{self.directory / str(step)} was saved with another model shape "
                                          f"({mismatch}); rerun with that run's settings, use another "
                                          "train.output_dir, or set checkpoint.fresh=true to start over") from None
                unreadable.append(self.skip(step, e))
                continue
            self._move_aside(unreadable)
            return step, state, meta
        self._move_aside(unreadable)
        return None

    def _shape_mismatch(self, step: int, abstract: Any) -> str | None:
        """'path: saved shape -> now shape' of the first array whose saved shape differs from `abstract`, or of a
        path only one side has; None when the saved tree fits (or its metadata can't be read either)."""
        try:
            tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(self.directory / str(step) / "state")).tree
            saved = _flat_shapes(tree)
        except Exception:  # noqa: BLE001 - no readable metadata: the checkpoint is unreadable, not another shape
            return None
        now = _flat_shapes(abstract)
        for path in sorted(set(saved) | set(now)):
            if saved.get(path) != now.get(path):
                return f"{path}: {saved.get(path, 'absent')} -> {now.get(path, 'absent')}"
        return None

    def skip(self, step: int, e: Exception) -> int:
        log.warning("checkpoint %s is unreadable (%s); falling back to the previous one",
                    self.directory / str(step), first_line(e))
        return step

    def _move_aside(self, steps: list[int]) -> None:
        """Moves unreadable checkpoints newer than the one restored to <directory>.unreadable/ (kept for a
        post-mortem, not deleted), so that the resumed run's own save of those steps can happen."""
        if not steps or self.read_only:
            return
        aside = self.directory.with_name(self.directory.name + UNREADABLE_SUFFIX)
        if jax.process_index() == 0:
            aside.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = aside / str(step)
                shutil.rmtree(dest, ignore_errors=True)
                (self.directory / str(step)).rename(dest)
                log.warning("moved unreadable checkpoint %s to %s", self.directory / str(step), dest)
        multihost_utils.sync_global_devices("flaxclf:unreadable-moved")
        self.manager.reload()

    def restore_params(self, step: int, abstract_params: Any, shardings: Any) -> Any:
        """The params of a checkpoint alone, onto `shardings`, without reading the optimizer state.

        Read with a PyTreeCheckpointer of its own: the manager registers the handler of its first use for
        "state" (StandardCheckpointHandler when it saved), and that handler can't restore a subtree."""
        target = {"params": sharded_target(abstract_params, shardings)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = ocp.PyTreeCheckpointer().restore(self.directory / str(step) / "state", args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=True))
        return out["params"]

    def best_step(self) -> int | None:
        """The kept checkpoint with the best metric; None when none was saved with metrics."""
        best = self.manager.best_step()
        return None if best is None else int(best)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


# The run settings a resume must keep: they shape the params and the optimizer state, or fix which rows make
# each training batch. Everything else (epochs, learning rate, eval and save cadence, mesh, dtype) may change.
RESUME_KEYS = ("model.name", "model.pooling", "model.problem_type", "model.param_dtype", "model.lora.rank",
               "model.lora.alpha", "model.lora.targets",
               "data.task", "data.train_file", "data.format", "data.text_column", "data.text_pair_column",
               "data.label_column", "data.label_type", "data.max_length", "data.buckets", "data.empty_text",
               "data.long_text", "data.stride", "data.head_tokens", "data.packing",
               "train.global_batch_size", "train.seed")
# What a field absent from an older checkpoint's config meant, where that is not today's default: runs from
# before data.packing padded their batches.
_BEFORE_FIELD = {"data.packing": "off"}


_ABSENT = object()


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part, _ABSENT) if isinstance(d, dict) else _ABSENT
    return d


def resume_changes(saved: dict, now: RunConfig) -> list[str]:
    """'key: old -> new' for each RESUME_KEYS field where a checkpoint's saved config differs from `now`."""
    current, default = now.to_dict(), RunConfig().to_dict()
    out = []
    for key in RESUME_KEYS:
        old = _get(saved, key)
        if old is _ABSENT:  # a field newer than the checkpoint: what it was then
            old = _BEFORE_FIELD.get(key, _get(default, key))
        if old != _get(current, key):
            out.append(f"{key}: {old} -> {_get(current, key)}")
    return out


def check_compatible(meta: dict, cfg: RunConfig, label_names: list[str], directory: Path,
                     base_sha256: str | None = None) -> None:
    """Refuses to continue a run directory whose checkpoints were made with other params, data or labels, or (a
    LoRA run) on a base whose weights have changed."""
    changes = resume_changes(meta.get("config", {}), cfg)
    if base_sha256 is not None and meta.get("base_sha256") not in (None, base_sha256):
        changes.append(f"the weights of model.name {cfg.model.name}: sha256 {meta['base_sha256'][:12]}... -> "
                       f"{base_sha256[:12]}...")
    if list(meta.get("label_names", [])) != list(label_names):
        changes.append(f"labels: {meta.get('label_names')} -> {list(label_names)}")
    if changes:
        raise CheckpointError(
            f"{directory} holds checkpoints of a run with other settings ({'; '.join(changes)}); rerun with the "
            f"old values, use another train.output_dir, or set checkpoint.fresh=true to start over")
