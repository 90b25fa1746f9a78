"""The optax chain: learning-rate schedule, weight-decay mask, clipping and AdamW, as HF Trainer builds them."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from flaxclf.config import OptimConfig
from flaxclf.runtime.sharding import path_str


def warmup_steps(cfg: OptimConfig, total_steps: int) -> int:
    """Warmup length; HF TrainingArguments.get_warmup_steps rounds up, so we do too."""
    return math.ceil(cfg.warmup_ratio * total_steps)


def schedule_constants(cfg: OptimConfig, total_steps: int) -> tuple[int, ...]:
    """What of the run's length the compiled schedule holds as constants, and so what a compiled train step
    depends on: nothing for a constant rate without warmup, the warmup length for a constant rate after warmup,
    and the warmup and the total for a decay (its slope is lr / (total - warmup)). A resumed run with another
    train.max_steps reuses the compiled steps exactly when these are equal."""
    if cfg.schedule == "constant":
        return (warmup_steps(cfg, total_steps),) if cfg.warmup_ratio else ()
    return (warmup_steps(cfg, total_steps), total_steps)


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup from 0, then linear or cosine decay to 0 at `total_steps`, or constant."""
    if total_steps < 1:
        raise ValueError(f"total_steps is {total_steps}; training needs at least one optimizer step")
    warmup = warmup_steps(cfg, total_steps)
    lr = cfg.learning_rate
    # Same lambdas as transformers' get_{linear,cosine,constant}_schedule_with_warmup, incl. their max(1, .).
    decay_len = max(1, total_steps - warmup)

    def schedule(count: Any) -> Any:
        step = jnp.asarray(count, jnp.float32)
        warm = step / max(1, warmup)
        progress = (step - warmup) / decay_len
        if cfg.schedule == "linear":
            after = jnp.maximum(0.0, (total_steps - step) / decay_len)
        elif cfg.schedule == "cosine":
            after = jnp.maximum(0.0, 0.5 * (1.0 + jnp.cos(math.pi * progress)))
        else:
            after = jnp.ones_like(step)
        return lr * jnp.where(step < warmup, warm, after)

    return schedule


def decay_mask(params: Any, decays: Callable[[str], bool]) -> Any:
    """True for the leaves that get weight decay, by the encoder's rule on each "/"-joined path (HF Trainer's
    get_decay_parameter_names: all but biases and norms, embeddings included)."""
    return jax.tree_util.tree_map_with_path(lambda key_path, _: decays(path_str(key_path)), params)


def make_optimizer(cfg: OptimConfig, total_steps: int,
                   decays: Callable[[str], bool]) -> optax.GradientTransformation:
    """Global-norm clipping (when max_grad_norm is set) followed by AdamW on the schedule, decaying the parameters
    the encoder's rule picks (flaxclf.models.interface.Encoder.decays)."""
    adamw = optax.adamw(lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                        weight_decay=cfg.weight_decay, mask=lambda params: decay_mask(params, decays))
    # identity keeps the state's structure (and so checkpoints) the same with and without clipping.
    clip = optax.identity() if cfg.max_grad_norm is None else optax.clip_by_global_norm(cfg.max_grad_norm)
    return optax.chain(clip, adamw)
