"""Packed rows: several texts share a row, told apart by segment ids (data.packing, flaxclf.data.packing).

A packed row's mask holds each token's segment: 1, 2, ..., S for the texts in the order they sit in the row, 0 on
padding. An unpacked row's 0/1 attention mask is the one-segment case. Each segment is a contiguous run of
tokens that starts with its text's first token ([CLS] or <s>). From the segment ids alone come what every encoder
needs to treat each text as if it were alone in its row: where it starts, its positions, which keys its queries
may attend, and its pooled vector.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from flaxclf.nn.pooling import POOLS, Pool


def starts(seg_BxL: jax.Array) -> jax.Array:
    """[B, L] bool: the first token of each segment."""
    before = jnp.pad(seg_BxL[:, :-1], ((0, 0), (1, 0)))
    return (seg_BxL != before) & (seg_BxL > 0)


def first_positions(seg_BxL: jax.Array, segments: int) -> jax.Array:
    """[B, S] int32: where segment s + 1 starts in its row (0 for a segment slot the row doesn't fill)."""
    is_s_BxSxL = seg_BxL[:, None, :] == jnp.arange(1, segments + 1, dtype=seg_BxL.dtype)[None, :, None]
    return jnp.argmax(is_s_BxSxL, axis=-1).astype(jnp.int32)


def positions(seg_BxL: jax.Array, counted_BxL: jax.Array | None = None) -> jax.Array:
    """[B, L] int32: each token's place within its own text, counting from 0 at the segment's first token; with
    `counted` (RoBERTa's ids != pad), 1 + the number of counted tokens of the text up to and including it, as
    transformers' create_position_ids_from_input_ids counts over a row of one text."""
    idx = jnp.broadcast_to(jnp.arange(seg_BxL.shape[-1], dtype=jnp.int32), seg_BxL.shape)
    first = starts(seg_BxL)
    if counted_BxL is None:
        return idx - jax.lax.cummax(jnp.where(first, idx, 0), axis=1)
    c = counted_BxL.astype(jnp.int32)
    total = jnp.cumsum(c, axis=1)
    # The running count before each segment's first token; cumulative counts only grow, so cummax carries it.
    return total - jax.lax.cummax(jnp.where(first, total - c, 0), axis=1)


def same_segment(seg_q: jax.Array, seg_k: jax.Array, packed: bool) -> jax.Array:
    """Where a query may attend a key, broadcasting seg_q [..., Q, 1] against seg_k [..., 1, K]: any real key of
    the row (unpacked: the mask is 0/1), or a key of the query's own text (packed). A padding query of a packed
    row attends the padding, so no query's keys are all masked."""
    return seg_k > 0 if not packed else seg_q == seg_k


def gather_rows(x_BxLxD: jax.Array, idx_BxS: jax.Array) -> jax.Array:
    """x at positions idx of each row: [B, S, D]."""
    return jnp.take_along_axis(x_BxLxD, idx_BxS[..., None].astype(jnp.int32), axis=1)


def pool(hidden_BxLxD: jax.Array, seg_BxL: jax.Array, segments: int, how: Pool) -> jax.Array:
    """flaxclf.nn.pooling.pool for each segment of a packed row: its first token ("cls"), or the mean / max over
    its tokens; [B, S, D], a segment slot the row doesn't fill gives 0 (mean, max) or position 0's vector."""
    if how == "cls":
        return gather_rows(hidden_BxLxD, first_positions(seg_BxL, segments))
    if how not in POOLS:
        raise ValueError(f"pooling {how!r} is not known; use one of {', '.join(POOLS)}")
    m_BxSxL = (seg_BxL[:, None, :] == jnp.arange(1, segments + 1, dtype=seg_BxL.dtype)[None, :, None])
    h = hidden_BxLxD.astype(jnp.float32)
    if how == "mean":
        m = m_BxSxL.astype(jnp.float32)
        out = jnp.einsum("bsl,bld->bsd", m, h, precision=jax.lax.Precision.HIGHEST)
        out = out / jnp.maximum(m.sum(-1), 1.0)[..., None]
    else:
        out = jnp.where(m_BxSxL[..., None], h[:, None], -jnp.inf).max(2)
        out = jnp.where(jnp.isfinite(out), out, 0.0)
    return out.astype(hidden_BxLxD.dtype)
