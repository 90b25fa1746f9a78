"""Dropout that can keep the first rows of a mask drawn for more rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RowDropout(nn.Module):
    """nn.Dropout (same rng stream, same mask bits) that can keep only the first rows of a mask drawn for
    `rows` positions: a layer that computes position 0 alone drops exactly what the full layer drops there."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, rows: int | None = None):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = x.shape if rows is None else (x.shape[0], rows, *x.shape[2:])
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=shape)[:, :x.shape[1]]
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
