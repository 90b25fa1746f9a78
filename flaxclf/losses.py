"""Losses of the three problem types, as PyTorch's BertForSequenceClassification computes them, with masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from flaxclf.vocab import MULTI, REGRESSION, SINGLE


def infer_problem_type(num_labels: int, labels: np.ndarray) -> str:
    """PyTorch's rule: one output -> regression; integer labels -> single-label; anything else -> multi-label."""
    if num_labels == 1:
        return REGRESSION
    if np.issubdtype(np.asarray(labels).dtype, np.integer):
        return SINGLE
    return MULTI


def per_example_loss(problem_type: str, logits_BxC: jax.Array, labels: jax.Array) -> jax.Array:
    """Loss of each example, [B], in float32; its unweighted mean is PyTorch's loss for the batch."""
    logits = logits_BxC.astype(jnp.float32)
    if problem_type == SINGLE:
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
    if problem_type == MULTI:
        # PyTorch averages BCE over all B*C entries; the mean over C per example keeps that when weights are 1.
        return optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32)).mean(-1)
    if problem_type == REGRESSION:
        y = labels.astype(jnp.float32).reshape(logits.shape[0], -1)
        return ((logits - y) ** 2).mean(-1)
    raise ValueError(f"unknown problem_type {problem_type!r}")


def loss(problem_type: str, logits_BxC: jax.Array, labels: jax.Array, weight_B: jax.Array | None = None,
         denominator: jax.Array | None = None) -> jax.Array:
    """Weighted mean loss; padded rows carry weight 0. `denominator` (default: sum of weights) lets k
    micro-batches divide by the whole batch's weight, so their summed gradients equal the big batch's."""
    per_ex = per_example_loss(problem_type, logits_BxC, labels)
    if weight_B is None:
        weight_B = jnp.ones_like(per_ex)
    if denominator is None:
        denominator = weight_B.sum()
    return (per_ex * weight_B).sum() / jnp.maximum(denominator, 1e-12)
