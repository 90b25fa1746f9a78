"""Attention variants over [B, H, L, Dh] heads: over every key, within a band of positions (dense or banded
blocks), in chunks of queries, and a few query rows ([CLS]) without projecting keys or values. Scores and softmax
are fp32; matmul inputs take the compute dtype (flaxclf.nn.matmul). `mask_BxL` is the 0/1 attention mask, or with
packed=True each token's segment id (flaxclf.nn.segments): a query then attends only the keys of its own text."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flaxclf.nn.matmul import mm
from flaxclf.nn.segments import same_segment

NEG = float(np.finfo(np.float32).min)  # the score of a masked key, as transformers' additive masks use


def softmax_attend(q, k, v, allowed, dtype, drop):
    """softmax(q k^T / sqrt(Dh) where allowed) v over the last two axes; scores and softmax in fp32. A masked
    score becomes fp32's min (HF adds it): its weight is exactly 0 beside any allowed key."""
    scores = mm(q, jnp.swapaxes(k, -1, -2), dtype) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(jnp.where(allowed, scores, NEG), axis=-1)
    if drop is not None:
        probs = drop(probs)
    return mm(probs, v, dtype)


def dense_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, mask_BxL, window: int | None = None,
                    dtype: Any = jnp.float32, drop=None, packed: bool = False) -> jax.Array:
    """Attention over every key (a global layer, window None) or within |i - j| <= window, building the [L, L]
    scores. `drop` is applied to the probabilities (attention dropout), or None."""
    n = q_BxHxLxDh.shape[2]
    allowed = same_segment(mask_BxL[:, None, :, None], mask_BxL[:, None, None, :], packed)
    if window is not None:
        pos = jnp.arange(n)
        allowed = allowed & (jnp.abs(pos[:, None] - pos[None, :]) <= window)
    return softmax_attend(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, allowed, dtype, drop)


def chunked_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, mask_BxL, dtype: Any = jnp.float32,
                      chunk: int = 512, packed: bool = False) -> jax.Array:
    """dense_attention(..., window=None) a block of `chunk` queries at a time (lax.map), each block recomputed in
    the backward pass (jax.checkpoint): a global layer holds [B, H, chunk, L] scores, not [B, H, L, L], in the
    forward pass and in the gradient. Each query's softmax still covers every key at once, so the result is the
    dense one's (up to the order XLA sums in). No attention dropout: the caller uses the dense path for that."""
    b, h, n, dh = q_BxHxLxDh.shape
    nc = -(-n // chunk)
    q = jnp.pad(q_BxHxLxDh, ((0, 0), (0, 0), (0, nc * chunk - n), (0, 0)))
    q_NcxBxHxCxDh = q.reshape(b, h, nc, chunk, dh).transpose(2, 0, 1, 3, 4)
    seg_NcxBxC = jnp.pad(mask_BxL, ((0, 0), (0, nc * chunk - n))).reshape(b, nc, chunk).transpose(1, 0, 2)

    @jax.checkpoint
    def block(xs):
        q_BxHxCxDh, seg_BxC = xs
        allowed = same_segment(seg_BxC[:, None, :, None], mask_BxL[:, None, None, :], packed)
        return softmax_attend(q_BxHxCxDh, k_BxHxLxDh, v_BxHxLxDh, allowed, dtype, None)

    out = jax.lax.map(block, (q_NcxBxHxCxDh, seg_NcxBxC))
    return out.transpose(1, 2, 0, 3, 4).reshape(b, h, nc * chunk, dh)[:, :, :n]


def with_neighbours(x, axis: int):
    """Blocks [..., nb, c, ...] (block axis `axis`) -> [..., nb, 3c, ...]: each block preceded by the previous
    one and followed by the next (zeros beyond the ends)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad)
    nb = x.shape[axis]
    parts = [jax.lax.slice_in_dim(xp, i, i + nb, axis=axis) for i in range(3)]
    return jnp.concatenate(parts, axis=axis + 1)


def banded_local_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, mask_BxL, window: int,
                           dtype: Any = jnp.float32, drop=None, packed: bool = False) -> jax.Array:
    """dense_attention(..., window) without the [L, L] scores: the sequence splits into blocks of c = window
    positions, and a block's queries score only the 3c keys of it and its neighbours, which hold every key
    within `window` of them. Masked keys get the same fp32 min as in the dense path, so a real query's output is
    the same sum; only the padding of L to a multiple of c is added (and masked)."""
    b, h, n, dh = q_BxHxLxDh.shape
    c = max(window, 1)
    nb = -(-n // c)
    extra = nb * c - n

    def blocks(x):  # [B, H, L, Dh] -> [B, H, nb, c, Dh]
        return jnp.pad(x, ((0, 0), (0, 0), (0, extra), (0, 0))).reshape(b, h, nb, c, dh)

    q, k, v = blocks(q_BxHxLxDh), with_neighbours(blocks(k_BxHxLxDh), 2), with_neighbours(blocks(v_BxHxLxDh), 2)
    seg_BxNbxC = jnp.pad(mask_BxL, ((0, 0), (0, extra))).reshape(b, nb, c)
    keys_BxNbx3c = with_neighbours(seg_BxNbxC, 1)
    # Query s of a block and key t of its 3c neighbourhood are (s + c) - t positions apart, whatever the block.
    offset_Cx3c = jnp.arange(c)[:, None] + c - jnp.arange(3 * c)[None, :]
    same = same_segment(seg_BxNbxC[:, None, :, :, None], keys_BxNbx3c[:, None, :, None, :], packed)
    allowed = (jnp.abs(offset_Cx3c) <= window)[None, None, None] & same
    out = softmax_attend(q, k, v, allowed, dtype, drop)
    return out.reshape(b, h, nb * c, dh)[:, :, :n]


def cls_attention(x_BxLxD, q_BxHxQxDh, bias_Bx1xQxL, keep, rate, key, value, dtype):
    """Attention of a few query rows (the [CLS] of each text) alone, without projecting a key or a value: the
    same sums regrouped. A query's score against position j is q . (x_j Wk + bk) = (Wk q) . x_j + q . bk, and
    its output sum_j p_j (x_j Wv + bv) = (sum_j p_j x_j) Wv + (sum_j p_j) bv, per head. So each query goes
    through Wk (H*D*Dh multiply-adds) instead of every position (L*D*D), and the weights mix x before Wv: about
    Q/L of the key and value projections' work.
    `keep` is the attention dropout mask's rows of these queries ([B or 1, 1, Q, L]; None without dropout).
    Returns [B, Q, D]."""
    b, _, d = x_BxLxD.shape
    _, h, nq, dh = q_BxHxQxDh.shape
    (wk, bk), (wv, bv) = key, value
    wk_HxDhxD = wk.reshape(d, h, dh).transpose(1, 2, 0)
    qk_BxHxQxD = mm(q_BxHxQxDh.transpose(1, 0, 2, 3).reshape(h, b * nq, dh), wk_HxDhxD, dtype) \
        .reshape(h, b, nq, d).transpose(1, 0, 2, 3)
    qb_BxHxQx1 = jnp.sum(q_BxHxQxDh * bk.reshape(h, 1, dh), -1, keepdims=True)
    scores_BxHQxL = mm(qk_BxHxQxD.reshape(b, h * nq, d), jnp.swapaxes(x_BxLxD, -1, -2), dtype)
    scores_BxHxQxL = scores_BxHQxL.reshape(b, h, nq, -1) + qb_BxHxQx1 + bias_Bx1xQxL
    e = jnp.exp(scores_BxHxQxL - jax.lax.stop_gradient(scores_BxHxQxL.max(-1, keepdims=True)))
    total = e.sum(-1, keepdims=True)
    if keep is not None:
        e = e * keep.astype(e.dtype)
        total = total * (1.0 - rate)
    mixed_BxHQxD = mm(e.reshape(b, h * nq, -1), x_BxLxD, dtype)  # sum_j e_j x_j per head and query
    mixed_HxBQxD = mixed_BxHQxD.reshape(b, h, nq, d).transpose(1, 0, 2, 3).reshape(h, b * nq, d)
    ctx_BxHxQxDh = mm(mixed_HxBQxD, wv.reshape(d, h, dh).transpose(1, 0, 2), dtype) \
        .reshape(h, b, nq, dh).transpose(1, 0, 2, 3)
    # + (sum_j e_j) bv, then divided by the softmax's sum (times keep_prob with dropout)
    ctx_BxHxQxDh = (ctx_BxHxQxDh + e.sum(-1, keepdims=True) * bv.reshape(h, 1, dh)) / total
    return ctx_BxHxQxDh.transpose(0, 2, 1, 3).reshape(b, nq, d)
