"""DeBERTa-v2/v3's encoder in Flax: transformers' PyTorch DebertaV2Model, same math and the same state-dict names
(its classifier: flaxclf.models.deberta.classifier).

What DeBERTa does differently from BERT, and how this module does it:
  * disentangled attention: beside content-to-content q_i . k_j, a query reads the key's relative position
    (c2p: q_i . Kr[d(i - j)]) and a key reads the query's (p2c: k_j . Qr[d(i - j)]), where Kr and Qr project
    the shared relative embeddings (encoder.rel_embeddings, optionally LayerNorm'd, dropped per layer) with the
    layer's pos_key_proj / pos_query_proj, or its key_proj / query_proj when share_att_key. d() maps a distance
    to an embedding row: clamp(bucket(i - j) + k, 0, 2k - 1), with v3's log buckets beyond k / 2;
  * the scores divide by sqrt(head_dim * (1 + the number of relative terms)).
transformers gathers the relative terms with [B, H, L, L] index arrays (torch.gather), which XLA lowers to slow
gathers and, in the backward pass, scatters. Here there is no index array: a row of the relative table serves
every (i, j) at the same distance, so a block of R queries (keys) is multiplied with the L + R - 1 rows that
its distances read (a matmul against a [L + R - 1, Dh] table picked once from the 2k rows with a constant index
of the static length; the batch's rows join the matmul's, so the table is not copied per example), and the
[R, L + R - 1] result is realigned to [R, L] by a skew: flatten, drop R - 1 elements, reshape to rows of
L + R - 2, keep the first L columns (_skew). Reshapes and slices only, forward and backward.
Packed rows need nothing more: distances within a text are the same wherever it sits in its row, and
the mask keeps each query within its own text.

`dtype` is the matmul input dtype, as in flaxclf.models.bert.encoder: fp32 (the default) is exact; bf16 is mixed
precision, with fp32 accumulation and fp32 results; embeddings, LayerNorms, softmax and the residual stream stay
fp32. Outputs at padded positions are not HF's (HF masks a padded query's every key, so its softmax spreads over
all positions; here it reads the real tokens): nothing real reads them, so logits, losses and gradients are the
same.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from flaxclf.models.deberta.spec import DebertaV2Spec
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.attention import NEG
from flaxclf.nn.dense import Dense
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.matmul import mm
from flaxclf.nn.segments import positions, same_segment


def _normal(spec: DebertaV2Spec):
    return jax.nn.initializers.normal(spec.initializer_range)


def layer_norm(spec: DebertaV2Spec) -> nn.LayerNorm:
    # Two-pass variance, as torch's LayerNorm: with DeBERTa's eps of 1e-7 the fast E[x^2] - E[x]^2 form drifts.
    return nn.LayerNorm(epsilon=spec.layer_norm_eps, dtype=jnp.float32, use_fast_variance=False)


def _skew(t: jax.Array, n: int) -> jax.Array:
    """[..., R, n + R - 1] -> [..., R, n]: out[..., i, j] = t[..., i, j - i + R - 1]. Row i of the flattened
    [R, n + R - 2] view, after dropping the first R - 1 elements, starts at t[i, R - 1 - i]."""
    *lead, r, w = t.shape
    flat = t.reshape(*lead, r * w)[..., r - 1: r - 1 + r * (w - 1)]
    return flat.reshape(*lead, r, w - 1)[..., :n]


REL_BLOCK = 64


def _block_rows(n: int) -> int:
    """Rows (queries, or keys for p2c) per block of the relative terms: the largest divisor of n from
    REL_BLOCK / 2 to REL_BLOCK, else n (one block). A block of R rows reaches n + R - 1 distances where one block
    of n reaches 2n - 1: blocks of 64 do 0.56x the work at n = 512, 0.75x at 128 (bench/README.md, section 9)."""
    return next((r for r in range(min(REL_BLOCK, n - 1), REL_BLOCK // 2 - 1, -1) if n % r == 0), n)


def _relative(x_BxHxLxDh, table_xRxD, proj, idx, dtype) -> jax.Array:
    """[B, H, L, L]: out[..., i, j] = x_i . proj(table)[idx[L - 1 + j - i]], i.e. row i of x against the
    projected row that the distance j - i reads, by blocks of R rows of x (_block_rows): block g's rows
    g R .. g R + R - 1 reach the L + R - 1 distances from -(g R + R - 1) to L - 1 - g R, one matmul against
    those rows (picked by a constant index from the 2k-row table) and a skew realign them."""
    b, h, n, dh = x_BxHxLxDh.shape
    r = _block_rows(n)
    g, w = n // r, n + r - 1
    order = np.stack([idx[n - r - i * r: n - r - i * r + w] for i in range(g)])  # [G, W]
    t_HxGxWxDh = jnp.transpose(proj(table_xRxD)[order].reshape(g, w, h, dh), (2, 0, 1, 3))
    # The batch's rows join each block's matmul rows: the table is not copied per example, and its gradient
    # is one matmul.
    x_HxGxBRxDh = jnp.moveaxis(x_BxHxLxDh.reshape(b, h, g, r, dh), 0, 2).reshape(h, g, b * r, dh)
    scores = mm(x_HxGxBRxDh, jnp.swapaxes(t_HxGxWxDh, -1, -2), dtype).reshape(h, g, b, r, w)
    return jnp.moveaxis(_skew(scores, n), 2, 0).reshape(b, h, n, n)


class _Embeddings(nn.Module):
    """Word (+ absolute position, + token type where the config has them) embeddings, embed_proj when the
    embedding width differs, LayerNorm, zeroed on padding, dropout; fp32 except the projection's matmul."""

    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        s, e = self.spec, self.spec.embedding_width
        self.word_embeddings = nn.Embed(s.vocab_size, e, embedding_init=_normal(s))
        if s.position_biased_input:
            self.position_embeddings = nn.Embed(s.max_position_embeddings, e, embedding_init=_normal(s))
        if s.type_vocab_size > 0:
            self.token_type_embeddings = nn.Embed(s.type_vocab_size, e, embedding_init=_normal(s))
        if e != s.hidden_size:
            self.embed_proj = Dense(e, s.hidden_size, _normal(s), use_bias=False, dtype=self.dtype)
        self.LayerNorm = layer_norm(s)
        self.dropout = Dropout(s.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, real_BxL, deterministic: bool = True):
        s = self.spec
        x = self.word_embeddings(input_ids.astype(jnp.int32))
        # torch's Embedding(padding_idx=pad) never updates the pad row: no gradient flows from a pad token.
        x = jnp.where((input_ids == s.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        if s.position_biased_input:
            x = x + self.position_embeddings(position_ids.astype(jnp.int32))
        if s.type_vocab_size > 0:
            x = x + self.token_type_embeddings(token_type_ids.astype(jnp.int32))
        if s.embedding_width != s.hidden_size:
            x = self.embed_proj(x)
        x = self.LayerNorm(x) * real_BxL[..., None].astype(jnp.float32)
        return self.dropout(x, deterministic=deterministic)


class _SelfAttention(nn.Module):
    """DisentangledSelfAttention; params attention/self/{query,key,value,pos_key,pos_query}_proj."""

    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        s, d = self.spec, self.spec.hidden_size
        self.query_proj = Dense(d, d, _normal(s), dtype=self.dtype)
        self.key_proj = Dense(d, d, _normal(s), dtype=self.dtype)
        self.value_proj = Dense(d, d, _normal(s), dtype=self.dtype)
        if s.relative_attention and not s.share_att_key:
            if "c2p" in s.pos_att_type:
                self.pos_key_proj = Dense(d, d, _normal(s), dtype=self.dtype)
            if "p2c" in s.pos_att_type:
                self.pos_query_proj = Dense(d, d, _normal(s), dtype=self.dtype)
        self.pos_dropout = Dropout(s.hidden_dropout_prob)

    def __call__(self, x_BxLxD, bias_Bx1xQxL, rel_2kxD, deterministic: bool = True):
        s, dt = self.spec, self.dtype
        b, n, d = x_BxLxD.shape
        h, dh = s.num_attention_heads, s.head_dim

        def heads(t_xRxD):  # [..., R, D] -> [..., H, R, Dh]
            return jnp.swapaxes(t_xRxD.reshape(*t_xRxD.shape[:-1], h, dh), -2, -3)

        q, k, v = heads(self.query_proj(x_BxLxD)), heads(self.key_proj(x_BxLxD)), heads(self.value_proj(x_BxLxD))
        scores = mm(q, jnp.swapaxes(k, -1, -2), dt)
        if s.relative_attention and s.pos_att_type:
            rel = self.pos_dropout(rel_2kxD, deterministic=deterministic)
            idx = s.relative_index(n)  # the table's row for each distance -(n - 1) .. n - 1 (a constant)
            if "c2p" in s.pos_att_type:  # q_i . Kr[d(i - j)]
                kproj = self.key_proj if s.share_att_key else self.pos_key_proj
                scores = scores + _relative(q, rel, kproj, idx[::-1], dt)
            if "p2c" in s.pos_att_type:  # k_j . Qr[d(i - j)]: row j, column i, then transposed
                qproj = self.query_proj if s.share_att_key else self.pos_query_proj
                scores = scores + jnp.swapaxes(_relative(k, rel, qproj, idx, dt), -1, -2)
        scores = scores * (dh * s.scale_factor) ** -0.5 + bias_Bx1xQxL
        # softmax(s) @ v as (exp(s - max) @ v) / sum, as flaxclf.models.bert.encoder does: XLA:CPU fuses the
        # exponential (and the dropout mask) into the second matmul.
        e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True)))
        rate = s.attention_probs_dropout_prob
        if deterministic or rate == 0.0:
            ctx = mm(e, v, dt) / e.sum(-1, keepdims=True)
        else:  # one [L, L] mask for every row and head, as flax's broadcast_dropout
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (1, 1, n, n))
            ctx = mm(e * keep.astype(e.dtype), v, dt) / (e.sum(-1, keepdims=True) * (1.0 - rate))
        return jnp.swapaxes(ctx, 1, 2).reshape(b, n, d)


class _DenseDropoutNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): DebertaV2SelfOutput and DebertaV2Output."""

    spec: DebertaV2Spec
    in_features: int
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = Dense(self.in_features, s.hidden_size, _normal(s), dtype=self.dtype)
        self.LayerNorm = layer_norm(s)
        self.dropout = Dropout(s.hidden_dropout_prob)

    def __call__(self, x, residual, deterministic: bool = True):
        return self.LayerNorm(self.dropout(self.dense(x), deterministic=deterministic) + residual)


class _Attention(nn.Module):
    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        self.self = _SelfAttention(self.spec, self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.hidden_size, self.dtype)

    def __call__(self, x, bias, rel, deterministic: bool = True):
        return self.output(self.self(x, bias, rel, deterministic), x, deterministic)


class _Intermediate(nn.Module):
    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = Dense(s.hidden_size, s.intermediate_size, _normal(s), dtype=self.dtype)

    def __call__(self, x):
        return ACTIVATIONS[self.spec.hidden_act](self.dense(x))


class DebertaV2Layer(nn.Module):
    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        self.attention = _Attention(self.spec, self.dtype)
        self.intermediate = _Intermediate(self.spec, self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.intermediate_size, self.dtype)

    def __call__(self, x, bias, rel, deterministic: bool = True):
        a = self.attention(x, bias, rel, deterministic)
        return self.output(self.intermediate(a), a, deterministic)


class _Layers(nn.Module):
    spec: DebertaV2Spec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cls = nn.remat(DebertaV2Layer, static_argnums=(4,)) if self.remat else DebertaV2Layer
        self.layers = [cls(self.spec, self.dtype, name=str(i)) for i in range(self.spec.num_hidden_layers)]

    def __call__(self, x, bias, rel, deterministic: bool = True):
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], bias, rel, deterministic))
        return states


class _Encoder(nn.Module):
    """DebertaV2Encoder: the layers, and the relative embeddings they share (LayerNorm'd with norm_rel_ebd)."""

    spec: DebertaV2Spec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        s = self.spec
        self.layer = _Layers(s, self.dtype, self.remat)
        if s.relative_attention:
            self.rel_embeddings = nn.Embed(2 * s.att_span, s.hidden_size, embedding_init=_normal(s))
            if s.rel_layer_norm:
                self.LayerNorm = layer_norm(s)

    def __call__(self, x, bias, deterministic: bool = True):
        s = self.spec
        rel = None
        if s.relative_attention:
            rel = self.rel_embeddings.embedding
            if s.rel_layer_norm:
                rel = self.LayerNorm(rel)
        return self.layer(x, bias, rel, deterministic)


class DebertaV2Model(nn.Module):
    """DebertaV2Model: embeddings -> encoder; (final hidden states [B, L, D], every state: HF's hidden_states)."""

    spec: DebertaV2Spec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.embeddings = _Embeddings(self.spec, self.dtype)
        self.encoder = _Encoder(self.spec, self.dtype, self.remat)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, deterministic: bool = True,
                 segments: int | None = None):
        """segments=S: packed rows, attention_mask holding segment ids (flaxclf.nn.segments)."""
        packed = segments is not None
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        position_ids = positions(attention_mask) if packed else \
            jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = self.embeddings(input_ids, token_type_ids, position_ids, attention_mask > 0, deterministic)
        allowed = same_segment(attention_mask[:, None, :, None], attention_mask[:, None, None, :], packed)
        # [B, 1, 1, L] (one row of keys for every query), or [B, 1, L, L] for a packed row's segments.
        bias_Bx1xQxL = jnp.where(allowed, 0.0, NEG)
        states = self.encoder(x, bias_Bx1xQxL, deterministic)
        return states[-1], tuple(states)
