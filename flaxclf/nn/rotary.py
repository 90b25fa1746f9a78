"""Rotary position embeddings (rotate-half), as transformers computes them."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary(x_BxHxLxDh: jax.Array, theta: float, pos_BxL: jax.Array | None = None) -> jax.Array:
    """HF's rotate-half rotary embedding at positions 0..L-1 (ModernBERT's eager/sdpa path: positions count
    padding too), or at each token's own position `pos` [B, L] (a packed row's texts), computed in fp32 as
    transformers does."""
    n, dh = x_BxHxLxDh.shape[-2:]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    at = jnp.arange(n, dtype=jnp.float32) if pos_BxL is None else pos_BxL.astype(jnp.float32)[:, None]
    freqs = at[..., None] * inv_freq
    angles_LxDh = jnp.concatenate([freqs, freqs], axis=-1)
    x1, x2 = jnp.split(x_BxHxLxDh, 2, axis=-1)
    return x_BxHxLxDh * jnp.cos(angles_LxDh) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles_LxDh)
