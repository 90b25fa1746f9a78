"""Dropout that can keep a few rows of a mask drawn for more rows."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RowDropout(nn.Module):
    """nn.Dropout (same rng stream, same mask bits) that can keep only some rows of a mask drawn for `rows`
    positions: a layer that computes a few positions alone ([CLS] of each text, at `at` [B, Q]; default the first
    Q) drops exactly what the full layer drops there."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, rows: int | None = None, at: jax.Array | None = None):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = x.shape if rows is None else (x.shape[0], rows, *x.shape[2:])
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=shape)
        if at is None:
            keep = keep[:, :x.shape[1]]
        else:
            keep = jnp.take_along_axis(keep, at.reshape(at.shape + (1,) * (keep.ndim - 2)), axis=1)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
