"""Orbax checkpoints of the train state: keep policy, sharded restore onto any mesh, params-only restore."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from flaxclf.config import CheckpointConfig

log = logging.getLogger("flaxclf")

LOWER_IS_BETTER = ("loss", "mse")


class CheckpointError(ValueError):
    """A run directory whose checkpoints can't be used for this run; the message says what to do."""


def lower_is_better(metric: str) -> bool:
    return metric.split("/")[-1] in LOWER_IS_BETTER


def sharded_target(abstract: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the *new* mesh's shardings: orbax then restores onto that layout (without
    them it silently restores the saved layout, and NamedTuples come back as lists)."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


class Checkpointer:
    """Saves every `every_steps` steps, on demand (end, eval, preemption); keeps the last `keep` and the best
    by `best_metric`. Items: "state" (arrays, written by every process) and "meta" (JSON)."""

    def __init__(self, directory: str | Path, cfg: CheckpointConfig, best_metric: str):
        self.directory = Path(directory).absolute()
        self.cfg, self.best_metric = cfg, best_metric
        policy = pp.AnyPreservationPolicy([
            pp.LatestN(n=cfg.keep),
            pp.BestN(get_metric_fn=lambda m: m[best_metric], reverse=lower_is_better(best_metric), n=1,
                     keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, enable_async_checkpointing=cfg.async_save, create=True,
            # Interval saves are decided by the loop (orbax's own interval would also save step 1).
            save_decision_policy=None)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def due(self, step: int) -> bool:
        return self.cfg.every_steps > 0 and step % self.cfg.every_steps == 0

    def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
        """Starts an asynchronous save; it blocks only for the device-to-host copy."""
        if step in self.manager.all_steps():
            return
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, metrics=metrics, force=True)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract: Any, shardings: Any) -> tuple[int, Any, dict] | None:
        """(step, state, meta) of the newest readable checkpoint, restored onto `shardings`; an unreadable one
        is skipped with a warning naming it. None when there is no checkpoint."""
        target = sharded_target(abstract, shardings)
        for step in reversed(self.steps()):
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
            except Exception as e:  # a torn or corrupted write: fall back to the one before
                log.warning("checkpoint %s is unreadable (%s: %s); falling back to the previous one",
                            self.directory / str(step), type(e).__name__, str(e).splitlines()[0][:200])
                continue
            return step, out["state"], out["meta"]
        return None

    def restore_params(self, step: int, abstract_params: Any, shardings: Any) -> Any:
        """The params of a checkpoint alone, without reading the optimizer state."""
        target = {"params": sharded_target(abstract_params, shardings)}
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True)))
        return out["state"]["params"]

    def best_step(self) -> int | None:
        best = self.manager.best_step()
        return None if best is None else int(best)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def check_compatible(meta: dict, model_name: str, label_names: list[str], directory: Path) -> None:
    """Refuses to continue a run directory made with another model or label set."""
    if meta.get("model") != model_name or list(meta.get("label_names", [])) != list(label_names):
        raise CheckpointError(
            f"{directory} holds checkpoints of another run (model {meta.get('model')!r}, labels "
            f"{meta.get('label_names')}), not of model {model_name!r} with labels {label_names}; use another "
            f"train.output_dir, or set checkpoint.fresh=true to discard them and start over")


def discard(directory: str | Path) -> None:
    """Removes a run's checkpoints (only when the user asked for a fresh start)."""
    shutil.rmtree(directory, ignore_errors=True)
