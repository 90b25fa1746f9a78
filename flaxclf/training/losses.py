"""Losses of the three problem types, as PyTorch's BertForSequenceClassification computes them, with masks, class
weights, label smoothing and pos_weight as torch.nn.CrossEntropyLoss and BCEWithLogitsLoss take them."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxclf.config import ConfigError, LossConfig
from flaxclf.options import MULTI, PROBLEM_TYPES, REGRESSION, SINGLE


@dataclass(frozen=True)
class LossSpec:
    """The loss with its weights as plain tuples: hashable, so jax.jit can take it as a static argument."""

    problem_type: str
    class_weights: tuple[float, ...] | None = None  # single-label: CrossEntropyLoss(weight=...), one per class
    pos_weight: tuple[float, ...] | None = None  # multi-label: BCEWithLogitsLoss(pos_weight=...), one per label
    label_smoothing: float = 0.0  # single-label: CrossEntropyLoss(label_smoothing=...)

    def __post_init__(self) -> None:
        if self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"unknown problem_type {self.problem_type!r}")


def as_spec(spec: LossSpec | str) -> LossSpec:
    """A plain problem type is its loss with no weights and no smoothing (the callers from before LossSpec)."""
    return spec if isinstance(spec, LossSpec) else LossSpec(spec)


def infer_problem_type(num_labels: int, labels: np.ndarray) -> str:
    """PyTorch's rule: one output -> regression; integer labels -> single-label; anything else -> multi-label."""
    if num_labels == 1:
        return REGRESSION
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return SINGLE
    return MULTI


def example_terms(spec: LossSpec | str, logits_BxC: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each example's numerator and denominator, [B] float32 each: PyTorch's mean loss of a batch is
    sum(num) / sum(den), which is what lets padded rows (weight 0) and micro-batches leave it unchanged."""
    spec = as_spec(spec)
    logits = logits_BxC.astype(jnp.float32)
    ones_B = jnp.ones(logits.shape[:1], jnp.float32)
    if spec.problem_type == SINGLE:
        return _cross_entropy(spec, logits, labels.astype(jnp.int32))
    if spec.problem_type == MULTI:
        # PyTorch averages BCE over all B*C entries: the mean over C with den 1 keeps that.
        return _binary_cross_entropy(spec, logits, labels.astype(jnp.float32)).mean(-1), ones_B
    y = labels.astype(jnp.float32).reshape(logits.shape[0], -1)
    return ((logits - y) ** 2).mean(-1), ones_B


def _cross_entropy(spec: LossSpec, logits_BxC: jax.Array, y_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """CrossEntropyLoss(weight=cw, label_smoothing=eps) as aten's cross_entropy_loss_label_smoothing: the smoothing
    term sums cw_c * -log p_c over classes, and the mean divides both terms by the sum of cw[y_i]."""
    if spec.class_weights is None and spec.label_smoothing == 0.0:
        return optax.softmax_cross_entropy_with_integer_labels(logits_BxC, y_B), jnp.ones_like(y_B, jnp.float32)
    n_classes = logits_BxC.shape[-1]
    cw_C = jnp.ones(n_classes, jnp.float32) if spec.class_weights is None else jnp.asarray(spec.class_weights,
                                                                                          jnp.float32)
    nll_BxC = -jax.nn.log_softmax(logits_BxC, axis=-1)
    nll_B = jnp.take_along_axis(nll_BxC, y_B[:, None], axis=-1)[:, 0]
    cw_B = cw_C[y_B]
    eps = spec.label_smoothing
    num_B = (1.0 - eps) * cw_B * nll_B + (eps / n_classes) * (nll_BxC * cw_C).sum(-1)
    return num_B, cw_B


def _binary_cross_entropy(spec: LossSpec, logits_BxC: jax.Array, y_BxC: jax.Array) -> jax.Array:
    """BCEWithLogitsLoss(pos_weight=pw) per entry: -(pw * y * log s(x) + (1 - y) * log(1 - s(x)))."""
    if spec.pos_weight is None:
        return optax.sigmoid_binary_cross_entropy(logits_BxC, y_BxC)
    pw_C = jnp.asarray(spec.pos_weight, jnp.float32)
    return -(pw_C * y_BxC * jax.nn.log_sigmoid(logits_BxC) + (1.0 - y_BxC) * jax.nn.log_sigmoid(-logits_BxC))


def batch_denominator(spec: LossSpec | str, labels: jax.Array, weight_B: jax.Array | None = None) -> jax.Array:
    """sum_i w_i den_i of a whole batch: k micro-batches that each divide by it sum to the whole batch's loss."""
    spec = as_spec(spec)
    n = labels.shape[0]
    weight_B = jnp.ones(n, jnp.float32) if weight_B is None else weight_B.astype(jnp.float32)
    if spec.problem_type == SINGLE and spec.class_weights is not None:
        return (weight_B * jnp.asarray(spec.class_weights, jnp.float32)[labels.astype(jnp.int32)]).sum()
    return weight_B.sum()


def loss(spec: LossSpec | str, logits_BxC: jax.Array, labels: jax.Array, weight_B: jax.Array | None = None,
         denominator: jax.Array | None = None) -> jax.Array:
    """PyTorch's mean loss over the rows of weight > 0; `denominator` (default: this batch's) lets micro-batches
    divide by the whole batch's, so their summed losses and gradients equal the big batch's."""
    num_B, _ = example_terms(spec, logits_BxC, labels)
    if weight_B is None:
        weight_B = jnp.ones_like(num_B)
    if denominator is None:
        denominator = batch_denominator(spec, labels, weight_B)
    # An all-padding batch has numerator and denominator 0: its loss is 0, not NaN. Class weights may be < 1,
    # so a positive denominator is used as it is.
    safe = jnp.where(denominator > 0, denominator, 1.0)
    return (num_B * weight_B).sum() / safe


def _label_weights(key: str, value: Sequence[float] | Mapping[str, float], label_names: Sequence[str]
                   ) -> tuple[float, ...]:
    """A list in label order, or a mapping by label name (labels left out weigh 1, as scikit-learn's dict rule)."""
    names = [str(n) for n in label_names]
    if isinstance(value, Mapping):
        unknown = [k for k in value if str(k) not in names]
        if unknown:
            raise ConfigError(f"{key}: unknown label(s) {', '.join(map(repr, unknown))}; the labels are "
                              f"{', '.join(names)}")
        by_name = {str(k): v for k, v in value.items()}
        weights = [by_name.get(n, 1.0) for n in names]
    else:
        weights = list(value)
        if len(weights) != len(names):
            raise ConfigError(f"{key}: {len(weights)} weights for {len(names)} labels; give one per label, in the "
                              f"order {', '.join(names)}, or a mapping label name -> weight")
    bad = [w for w in weights if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w)
           or w < 0]
    if bad:
        raise ConfigError(f"{key}: {bad[0]!r} is not a finite number >= 0; every weight must be one")
    return tuple(float(w) for w in weights)


def _balanced_class_weights(labels_N: np.ndarray, label_names: Sequence[str]) -> tuple[float, ...]:
    """n_samples / (n_classes * bincount): scikit-learn's compute_class_weight("balanced")."""
    n_classes = len(label_names)
    counts = np.bincount(np.asarray(labels_N, np.int64).reshape(-1), minlength=n_classes)[:n_classes]
    absent = [str(label_names[c]) for c in np.flatnonzero(counts == 0)]
    if absent:
        raise ConfigError(f"loss.class_weights: balanced needs every class in the training split, which has no "
                          f"example of {', '.join(absent)}; give the weights as a list or mapping instead")
    return tuple(float(w) for w in len(labels_N) / (n_classes * counts.astype(np.float64)))


def _balanced_pos_weight(labels_NxC: np.ndarray, label_names: Sequence[str]) -> tuple[float, ...]:
    """negatives / positives of each label over the training split (the pos_weight PyTorch's docs suggest)."""
    y = np.asarray(labels_NxC, np.float64).reshape(-1, len(label_names))
    pos = y.sum(0)  # soft labels count by their mass, as BCE weighs them
    absent = [str(label_names[c]) for c in np.flatnonzero(pos == 0)]
    if absent:
        raise ConfigError(f"loss.pos_weight: balanced needs a positive of every label in the training split, which "
                          f"has none of {', '.join(absent)}; give the weights as a number, list or mapping instead")
    return tuple(float(w) for w in (1.0 - y).sum(0) / pos)


def _is_none(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value == "none")


def resolve(loss_cfg: LossConfig, problem_type: str, label_names: Sequence[str], train_labels: Any) -> LossSpec:
    """The config's loss settings as concrete weights, computed from the training labels where they say balanced."""
    cw, pw, eps = loss_cfg.class_weights, loss_cfg.pos_weight, loss_cfg.label_smoothing
    if "balanced" in (cw, pw) and train_labels is None:
        raise ValueError("balanced loss weights need the training split's labels (train_labels is None)")
    if not _is_none(cw) and problem_type != SINGLE:
        raise ConfigError(f"loss.class_weights applies to {SINGLE} only, and this run is {problem_type}; "
                          f"set it to none" + ("; use loss.pos_weight for multi-label" if problem_type == MULTI
                                               else ""))
    if eps and problem_type != SINGLE:
        raise ConfigError(f"loss.label_smoothing applies to {SINGLE} only, and this run is {problem_type}; "
                          "set it to 0")
    if not _is_none(pw) and problem_type != MULTI:
        raise ConfigError(f"loss.pos_weight applies to {MULTI} only, and this run is {problem_type}; set it to none")
    class_weights = pos_weight = None
    if not _is_none(cw):
        if cw == "balanced":
            class_weights = _balanced_class_weights(train_labels, label_names)
        elif isinstance(cw, str):
            raise ConfigError(f"loss.class_weights: {cw!r} is not one of 'none', 'balanced', a list or a mapping")
        else:
            class_weights = _label_weights("loss.class_weights", cw, label_names)
        if not any(class_weights):
            raise ConfigError("loss.class_weights: every weight is 0, so no example counts; give some class a "
                              "weight > 0")
    if not _is_none(pw):
        if pw == "balanced":
            pos_weight = _balanced_pos_weight(train_labels, label_names)
        elif isinstance(pw, str):
            raise ConfigError(f"loss.pos_weight: {pw!r} is not one of 'none', 'balanced', a number, a list or a "
                              "mapping")
        elif isinstance(pw, (int, float)) and not isinstance(pw, bool):
            pos_weight = _label_weights("loss.pos_weight", [pw] * len(label_names), label_names)
        else:
            pos_weight = _label_weights("loss.pos_weight", pw, label_names)
    return LossSpec(problem_type, class_weights, pos_weight, float(eps))


def describe(spec: LossSpec, label_names: Sequence[str]) -> str | None:
    """One line for the run's start that says which weights the loss uses (None: PyTorch's plain loss)."""
    def named(weights: tuple[float, ...]) -> str:
        return ", ".join(f"{n} {w:.4f}" for n, w in zip(label_names, weights, strict=True))

    parts = []
    if spec.class_weights is not None:
        parts.append(f"class weights {named(spec.class_weights)}")
    if spec.pos_weight is not None:
        parts.append(f"pos_weight {named(spec.pos_weight)}")
    if spec.label_smoothing:
        parts.append(f"label smoothing {spec.label_smoothing:g}")
    return "loss: " + "; ".join(parts) if parts else None
