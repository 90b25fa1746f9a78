"""Dropout: flax's nn.Dropout, with the same rng stream and the same mask bits, drawn in one pass over memory, and
able to keep a few rows of a mask drawn for more rows."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))


def _threefry2x32(k1: jax.Array, k2: jax.Array, x1: jax.Array, x2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The Threefry-2x32 hash (20 rounds) as JAX computes it, unrolled."""
    ks = (k1, k2, k1 ^ k2 ^ np.uint32(0x1BD11BDA))
    x1, x2 = x1 + ks[0], x2 + ks[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = ((x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))) ^ x1
        x1 = x1 + ks[(i + 1) % 3]
        x2 = x2 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def bernoulli(key: jax.Array, p: float | jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """jax.random.bernoulli(key, p, shape), bit for bit (threefry keys, partitionable threefry: JAX's default).

    Why not jax.random.bernoulli itself: on CPU, JAX lowers the hash as a loop of five steps, each a pass over
    [shape]-sized arrays, and a BERT-base hidden-state mask ([32, 128, 768]) then takes ~40 ms, 15 times this
    function, whose unrolled hash XLA fuses with the float conversion and the comparison into one pass
    (bench/README.md section 8, "Dropout masks"). The counters are each element's flat index, built from one iota
    per dimension, so a sharded mask is the same as an unsharded one, as with JAX's.

    XLA fuses the hash into the mask's consumers, where it is recomputed (a train step recomputes a mask in the
    backward pass rather than keep it): draw a mask of the shape it drops, never one that is broadcast (attention's
    [1, 1, L, L] mask over batch and heads takes jax.random.bernoulli, whose loop's result is kept).
    """
    size = math.prod(shape)
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = jax.random.key_impl(key)
        if key.shape != () or getattr(impl, "name", impl) != "threefry2x32":
            return jax.random.bernoulli(key, p, shape)  # another generator: its own bits
        key = jax.random.key_data(key)
    elif key.dtype != jnp.uint32 or key.shape != (2,):
        return jax.random.bernoulli(key, p, shape)
    if size >= 2 ** 32 or not jax.config.jax_threefry_partitionable:
        return jax.random.bernoulli(key, p, shape)
    if size == 0:
        return jnp.zeros(shape, bool)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index = sum(lax.broadcasted_iota(jnp.uint32, shape, d) * np.uint32(s) for d, s in enumerate(strides))
    b1, b2 = _threefry2x32(key[0], key[1], jnp.zeros(shape, jnp.uint32), index)
    # jax.random.uniform's float: 23 random mantissa bits under an exponent of 1.0, less 1.0
    uniform = lax.bitcast_convert_type(((b1 ^ b2) >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    return uniform < p


class Dropout(nn.Module):
    """nn.Dropout (same rng stream, same mask bits: `bernoulli`) that can keep only some rows of a mask drawn for
    `rows` positions: a layer that computes a few positions alone ([CLS] of each text, at `at` [B, Q]; default the
    first Q) drops exactly what the full layer drops there."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, rows: int | None = None, at: jax.Array | None = None):
        if deterministic or self.rate == 0.0:
            return x
        if self.rate == 1.0:  # as nn.Dropout: x / 0 would put NaN in the gradient
            return jnp.zeros_like(x)
        keep_prob = 1.0 - self.rate
        shape = x.shape if rows is None else (x.shape[0], rows, *x.shape[2:])
        keep = bernoulli(self.make_rng("dropout"), keep_prob, shape)
        if rows is not None and at is None:
            keep = keep[:, :x.shape[1]]
        elif at is not None:
            keep = jnp.take_along_axis(keep, at.reshape(at.shape + (1,) * (keep.ndim - 2)), axis=1)
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))
