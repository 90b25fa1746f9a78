"""The vector a classifier head reads from the final hidden states."""

from __future__ import annotations

from typing import Literal, get_args

import jax
import jax.numpy as jnp

Pool = Literal["cls", "mean", "max"]
POOLS: tuple[str, ...] = get_args(Pool)


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, how: Pool) -> jax.Array:
    """Position 0 ("cls"), or the masked mean / max over real tokens; an all-padding row gives 0, not NaN or
    -inf. Computed in fp32, returned in the hidden states' dtype."""
    if how == "cls":
        return hidden_BxLxD[:, 0]
    if how not in POOLS:
        raise ValueError(f"pooling {how!r} is not known; use one of {', '.join(POOLS)}")
    m = mask_BxL[..., None].astype(jnp.float32)
    h = hidden_BxLxD.astype(jnp.float32)
    if how == "mean":
        out = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    else:  # max: padding can never win
        out = jnp.where(m > 0, h, -jnp.inf).max(1)
        out = jnp.where(jnp.isfinite(out), out, 0.0)
    return out.astype(hidden_BxLxD.dtype)
