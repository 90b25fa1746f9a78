"""A trained run, read back: its config, its model, the params of a checkpoint (never the optimizer state), and
its export to the Hugging Face format."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils

from flaxclf import assets
from flaxclf.config import CheckpointConfig, MeshConfig, RunConfig, from_dict
from flaxclf.hf import peft, weights
from flaxclf.models.classifier import abstract_variables, make_classifier
from flaxclf.models.interface import Classifier
from flaxclf.nn import lora
from flaxclf.nn.lora import LoraSpec
from flaxclf.options import HF_POOLING
from flaxclf.runtime import sharding
from flaxclf.training.checkpoint import CHECKPOINTS, Checkpointer, CheckpointError, first_line
from flaxclf.training.steps import place_frozen

log = logging.getLogger("flaxclf")


def open_run(run_dir: str | Path) -> tuple[Checkpointer, RunConfig]:
    """A read-only Checkpointer over <run_dir>/checkpoints and the run's resolved config (from the newest
    checkpoint whose meta is readable)."""
    directory = Path(run_dir).absolute() / CHECKPOINTS
    if not directory.is_dir():
        raise CheckpointError(f"{run_dir} has no {CHECKPOINTS}/ folder; train into it first "
                              f"(train.output_dir={run_dir})")
    probe = Checkpointer(directory, CheckpointConfig(), "validation/accuracy", read_only=True)
    for step in reversed(probe.steps()):
        try:
            cfg = from_dict(probe.read_meta(step)["config"])
        except Exception as e:
            probe.skip(step, e)
            continue
        probe.close()
        return Checkpointer(directory, cfg.checkpoint, f"validation/{cfg.train.best_metric}", read_only=True), cfg
    probe.close()
    raise CheckpointError(f"{directory} holds no complete, readable checkpoint; train into {run_dir} first")


def _candidates(ckpt: Checkpointer, step: int | str | None) -> list[int]:
    """Steps to try, in order: the newest first for None; exactly one for 'best' or a number."""
    steps = ckpt.steps()
    if step is None:
        return steps[::-1]
    if step == "best":
        best = ckpt.best_step()
        if best is None:
            log.info("%s has no checkpoint saved with %s; using the latest", ckpt.directory, ckpt.best_metric)
        return [steps[-1] if best is None else best]
    if isinstance(step, int) and not isinstance(step, bool) and step in steps:
        return [step]
    raise CheckpointError(f"{ckpt.directory} has no checkpoint {step!r}; choose one of {steps}, 'best' or "
                          f"leave it out for the latest")


def classifier_from_meta(meta: dict, cfg: RunConfig) -> tuple[Classifier, Path]:
    """The model a checkpoint was trained as (the backbone's folder + the head settings saved in its meta)."""
    model_dir = assets.resolve_model(cfg.model.name)
    overrides = dict(meta["classifier"], label_names=tuple(meta["classifier"]["label_names"]))
    config = weights.classifier_config(model_dir, cfg.model.impl, **overrides)
    if meta.get("lora"):
        config = config.replace(lora=LoraSpec.from_json(meta["lora"]))
    return make_classifier(config, dtype=jnp.dtype(cfg.model.dtype), impl=cfg.model.impl), model_dir


def frozen_variables(model: Classifier, model_dir: Path, meta: dict, shardings: Any) -> dict:
    """A LoRA run's frozen variables, from its base model after checking that the base's weights are those the
    run adapted; an empty dict for a run without LoRA."""
    spec = model.config.lora
    if spec is None:
        return {}
    if meta.get("base_sha256") != weights.checkpoint_sha256(model_dir):
        raise CheckpointError(f"the weights in {model_dir} (model.name) are not those this LoRA run adapted (their "
                              "sha256 differs from the one the run recorded); point model.name at the base it was "
                              "trained on")
    return place_frozen(weights.load_params(model, model_dir, jax.random.PRNGKey(0)), shardings, spec)


def load_params_for_inference(run_dir: str | Path, step: int | str | None = None,
                              mesh: jax.sharding.Mesh | None = None) -> tuple[Classifier, Any, dict]:
    """(model, params, meta) of a run's checkpoint, reading the params only (never the optimizer state).

    step: None for the newest readable checkpoint (an unreadable one falls back to the previous, with a
    warning), "best" for the best by train.best_metric, or a step number. mesh: where the params go, sharded
    by its encoder's sharding rules (None: every device, data-parallel). meta is the checkpoint's meta (model,
    label_names, problem_type, classifier, config, data, best) plus "step" and "model_dir"."""
    ckpt, cfg = open_run(run_dir)
    try:
        mesh = mesh if mesh is not None else sharding.make_mesh(MeshConfig())
        candidates = _candidates(ckpt, step)
        for s in candidates:
            try:
                meta = ckpt.read_meta(s)
                model, model_dir = classifier_from_meta(meta, from_dict(meta["config"]))
                abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.dtype(cfg.model.param_dtype)),
                                        abstract_variables(model))
                shardings = sharding.tree_shardings(abstract, mesh, model.config.encoder.sharding_rules)
                trained = lora.split(abstract, model.config.lora)[0]
                params = ckpt.restore_params(s, trained, lora.split(shardings, model.config.lora)[0])
                params = lora.merge(params, frozen_variables(model, model_dir, meta, shardings))
            except (CheckpointError, assets.AssetError, weights.WeightsError):
                raise
            except Exception as e:
                if len(candidates) == 1:
                    raise CheckpointError(f"checkpoint {ckpt.directory / str(s)} is unreadable "
                                          f"({first_line(e)})") from e
                ckpt.skip(s, e)
                continue
            return model, params, {**meta, "step": s, "model_dir": str(model_dir)}
        raise CheckpointError(f"no checkpoint in {ckpt.directory} could be read")
    finally:
        ckpt.close()


def export_checkpoint(run_dir: str | Path, out_dir: str | Path, step: int | str | None = None,
                      adapter: bool = False) -> tuple[Path, int]:
    """Writes a run's checkpoint (latest, 'best' or a step number) as a Hugging Face
    BertForSequenceClassification folder (config.json, model.safetensors, tokenizer files; a LoRA run's adapter
    merged into its layers), or with `adapter` a LoRA run's adapter as peft's folder; returns the folder and the
    step exported."""
    model, params, meta = load_params_for_inference(run_dir, step)
    spec = model.config.lora
    if adapter and spec is None:
        raise CheckpointError(f"{run_dir} was trained without LoRA (model.lora.rank null), so it has no adapter; "
                              "export it without --adapter")
    host = jax.tree.map(sharding.to_host, params)
    out = Path(out_dir).expanduser().absolute()
    if jax.process_index() == 0:
        if adapter:
            if model.config.pooling != HF_POOLING:
                raise CheckpointError(f"pooling={model.config.pooling!r} has no PyTorch head for peft to load the "
                                      "adapter onto; export needs pooling=cls_pooler")
            base = peft.base_reference(meta["model"], Path(meta["model_dir"]))
            out = peft.export_adapter(out, model.config, host, base)
        else:
            out = weights.export_hf(out, model.config.replace(lora=None), lora.merged(host, spec), meta["model_dir"])
    multihost_utils.sync_global_devices("flaxclf:exported")
    return out, meta["step"]
