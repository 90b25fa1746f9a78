"""A BERT encoder with the parameter tree, initial values and dropout masks of transformers' FlaxBertModule
(add_pooling_layer=False), laid out for XLA.

Same math as FlaxBertModule, in fp32 to the last bit of the dropout masks; what differs is the layout:
  * each of query, key and value moves its heads ahead of the sequence once, right after its projection
    ([B, L, H, Dh] -> [B, H, L, Dh]), so both attention matmuls are plain batched GEMMs over B*H contiguous
    [L, Dh] blocks; FlaxBertSelfAttention's einsums ('...qhd,...khd->...hqk') make XLA:CPU copy operands into
    that layout inside every dot, forward and backward. Three separate projections, not one against the
    concatenated kernels: the fused form's [B, L, 3, H, Dh] transpose makes the backward pass copy the stacked
    gradient twice;
  * the padding bias [B, 1, 1, L] is built once per forward pass instead of once per layer;
  * softmax(s) @ v is computed as (exp(s - max) @ v) / sum (with dropout: (exp(s - max) * mask) @ v / (sum *
    keep_prob)), which XLA:CPU fuses into the second matmul instead of writing and re-reading the [B, H, L, L]
    probabilities;
  * with cls_only=True (the classifier's [CLS] poolings) the last layer computes position 0 alone (each text's
    first position, in a packed row), and attends from it without projecting keys or values
    (flaxclf.nn.attention.cls_attention);
  * packed rows (segments=S: the mask holds each token's text, flaxclf.nn.segments) restart the positions at each
    text and keep each text's attention within itself, so a text's outputs are those it has alone in a row.
`dtype` is the matmul input dtype. fp32 (the default) is exact. bf16 is mixed precision, as torch's autocast:
matmul inputs in bf16 with fp32 accumulation and an fp32 result (flaxclf.nn.matmul); embeddings, LayerNorm,
GELU, softmax, dropout and the residual stream stay fp32. What each choice gains is measured in bench/README.md.
Parameter names, initializers and the order of `make_rng` calls follow transformers' modules so that
`init` gives the same values and dropout draws the same masks (checked in tests/test_fast_bert.py).
The same encoder serves every family of flaxclf.models.bert.families: what a family changes (token types,
RoBERTa's positions, a factorized embedding with its projection, the dropouts after the attention and
feed-forward outputs, ALBERT's weights shared across layer positions) is read from its spec, not coded as another
encoder.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.models.bert.spec import BertSpec
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.attention import cls_attention
from flaxclf.nn.dense import Dense
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.matmul import mm
from flaxclf.nn.segments import first_positions, gather_rows, positions, same_segment


def _normal(spec: BertSpec):
    return jax.nn.initializers.normal(spec.initializer_range)


class Embeddings(nn.Module):
    """Word + token-type (where the family has them) + position embeddings, LayerNorm, dropout; always fp32 (a
    gather, no matmul). Their width is the family's embedding size (ELECTRA, ALBERT factorize it)."""

    spec: BertSpec

    def setup(self):
        s, e = self.spec, self.spec.embedding_width
        self.word_embeddings = nn.Embed(s.vocab_size, e, embedding_init=_normal(s))
        self.position_embeddings = nn.Embed(s.max_position_embeddings, e, embedding_init=_normal(s))
        if s.family.token_types:
            self.token_type_embeddings = nn.Embed(s.type_vocab_size, e, embedding_init=_normal(s))
        self.LayerNorm = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=jnp.float32)
        self.dropout = Dropout(rate=s.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        x = self.word_embeddings(input_ids.astype("i4"))
        if self.spec.family.token_types:
            x = x + self.token_type_embeddings(token_type_ids.astype("i4"))
        x = x + self.position_embeddings(position_ids.astype("i4"))
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class SelfAttention(nn.Module):
    """Heads-major attention; params attention/self/{query,key,value}/{kernel,bias}."""

    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        d = self.spec.hidden_size
        self.query = Dense(d, d, _normal(self.spec), dtype=self.dtype)
        self.key = Dense(d, d, _normal(self.spec), dtype=self.dtype)
        self.value = Dense(d, d, _normal(self.spec), dtype=self.dtype)

    def __call__(self, x_BxLxD, bias_Bx1xQxL, deterministic: bool = True, cls_only: bool = False, at=None):
        """`bias`: [B, 1, 1, L] (one row of keys for every query) or [B, 1, L, L] (a packed row's); with cls_only,
        the queries are position 0, or each text's first position `at` [B, S]."""
        s = self.spec
        b, n, d = x_BxLxD.shape
        h = s.num_attention_heads
        dh = d // h
        dt = self.dtype

        def heads(rows_BxRxD, dense):  # [B, R, D] -> [B, H, R, Dh]: heads ahead of the sequence, once
            r = rows_BxRxD.shape[1]
            return dense(rows_BxRxD).reshape(b, r, h, dh).transpose(0, 2, 1, 3)

        q = heads((x_BxLxD[:, :1] if at is None else gather_rows(x_BxLxD, at)) if cls_only else x_BxLxD, self.query)
        q = q / jnp.sqrt(dh).astype(q.dtype)  # scaled before the product, as flax's attention does
        rate = s.attention_probs_dropout_prob
        keep = None
        if not deterministic and rate > 0.0:
            # flax's dot_product_attention_weights(broadcast_dropout=True): one [L, L] mask for all rows/heads;
            # the cls_only path takes its query rows, so both paths drop the same weights.
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (1, 1, n, n))
            keep = keep[:, :, :q.shape[2]] if at is None else keep[0, 0][at][:, None]
        if cls_only:
            bias_Bx1xQxL = bias_Bx1xQxL if at is None else jnp.take_along_axis(bias_Bx1xQxL, at[:, None, :, None],
                                                                                 axis=2)
            # An adapted key or value (LoRA) projects every position: its low-rank term does not regroup.
            if not (self.key.adapted or self.value.adapted):
                return cls_attention(x_BxLxD, q, bias_Bx1xQxL, keep, rate, self.key.weights(), self.value.weights(),
                                     dt)
        k, v = heads(x_BxLxD, self.key), heads(x_BxLxD, self.value)
        scores_BxHxQxL = mm(q, jnp.swapaxes(k, -1, -2), dt) + bias_Bx1xQxL
        # softmax(s) @ v as (exp(s - max) @ v) / sum: XLA:CPU fuses the exponential (and the dropout mask) into
        # the second matmul instead of writing and re-reading the [B, H, L, L] probabilities.
        e = jnp.exp(scores_BxHxQxL - jax.lax.stop_gradient(scores_BxHxQxL.max(-1, keepdims=True)))
        if keep is None:
            ctx_BxHxQxDh = mm(e, v, dt) / e.sum(-1, keepdims=True)
        else:
            ctx_BxHxQxDh = mm(e * keep.astype(e.dtype), v, dt) / (e.sum(-1, keepdims=True) * (1.0 - rate))
        return ctx_BxHxQxDh.transpose(0, 2, 1, 3).reshape(b, q.shape[2], d)


class _DenseDropoutNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): FlaxBertSelfOutput and FlaxBertOutput. Families without
    that dropout (DistilBERT after attention, ALBERT after the feed-forward) set `has_dropout` False."""

    spec: BertSpec
    in_features: int
    dtype: Any = jnp.float32
    has_dropout: bool = True

    def setup(self):
        s = self.spec
        self.dense = Dense(self.in_features, s.hidden_size, _normal(s), dtype=self.dtype)
        self.LayerNorm = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=jnp.float32)
        # Named "dropout" as in transformers' modules: flax folds the module path into the mask's rng.
        self.dropout = Dropout(rate=s.hidden_dropout_prob if self.has_dropout else 0.0)

    def __call__(self, x, residual, deterministic: bool = True, rows: int | None = None, at=None):
        return self.LayerNorm(self.dropout(self.dense(x), deterministic, rows, at) + residual)


class Attention(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.self = SelfAttention(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.hidden_size, dtype=self.dtype,
                                        has_dropout=self.spec.family.attention_output_dropout)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False, at=None):
        rows = x.shape[1] if cls_only else None
        residual = (x[:, :1] if at is None else gather_rows(x, at)) if cls_only else x
        return self.output(self.self(x, bias, deterministic, cls_only, at), residual, deterministic, rows, at)


class Intermediate(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = Dense(s.hidden_size, s.intermediate_size, _normal(s), dtype=self.dtype)

    def __call__(self, x):
        return ACTIVATIONS[self.spec.hidden_act](self.dense(x))


class Layer(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.attention = Attention(self.spec, dtype=self.dtype)
        self.intermediate = Intermediate(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.intermediate_size, dtype=self.dtype,
                                        has_dropout=self.spec.family.ffn_output_dropout)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False, at=None):
        a = self.attention(x, bias, deterministic, cls_only, at)
        return self.output(self.intermediate(a), a, deterministic, x.shape[1] if cls_only else None, at)


class _Layers(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cls = nn.remat(Layer, static_argnums=(3, 4)) if self.remat else Layer  # `at` (5) is traced
        # One module per weight set; ALBERT's positions share theirs (spec.layer_params).
        self.layers = [cls(self.spec, dtype=self.dtype, name=str(k)) for k in sorted(set(self.spec.layer_params()))]

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False, at=None):
        order = self.spec.layer_params()
        for i, k in enumerate(order):
            last = cls_only and i == len(order) - 1
            x = self.layers[k](x, bias, deterministic, last, at if last else None)
        return x


class Encoder(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.layer = _Layers(self.spec, dtype=self.dtype, remat=self.remat)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False, at=None):
        return self.layer(x, bias, deterministic, cls_only, at)


class FastBertModule(nn.Module):
    """FlaxBertModule(add_pooling_layer=False) with the same params; returns the final hidden states [B, L, D],
    or with cls_only=True those of position 0 alone, [B, 1, D]: the last layer then computes the one query row
    that [CLS] pooling reads, and attends over every position without projecting their keys and values: about
    1/L of its work. With segments=S the rows are packed (attention_mask holds segment ids 1..S, 0 on padding)
    and cls_only returns each text's first position, [B, S, D]."""

    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False  # gradient checkpointing of each layer

    def setup(self):
        s = self.spec
        self.embeddings = Embeddings(s)
        if s.projects_embeddings:  # ELECTRA's embeddings_project, ALBERT's embedding_hidden_mapping_in
            self.embeddings_project = Dense(s.embedding_width, s.hidden_size, _normal(s), dtype=self.dtype)
        self.encoder = Encoder(s, dtype=self.dtype, remat=self.remat)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
                 cls_only: bool = False, segments: int | None = None):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        packed = segments is not None
        if self.spec.family.positions_from_padding:  # RoBERTa: pad + 1, pad + 2, ... on tokens, pad on padding
            real = (input_ids != self.spec.pad_token_id).astype(jnp.int32)
            counted = positions(attention_mask, real) if packed else jnp.cumsum(real, axis=-1)
            position_ids = counted * real + self.spec.pad_token_id
        elif packed:
            position_ids = positions(attention_mask)
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
        if self.spec.projects_embeddings:
            x = self.embeddings_project(x)
        # As FlaxBertSelfAttention's bias: 0 on tokens, the dtype's min on padding (fp32: scores stay fp32); a
        # packed row's [B, 1, L, L] bias also masks the other texts' keys.
        allowed = same_segment(attention_mask[:, None, :, None] if packed else None,
                               attention_mask[:, None, None, :], packed)
        bias_Bx1xQxL = jnp.where(allowed, 0.0, jnp.finfo(jnp.float32).min)
        at = first_positions(attention_mask, segments) if packed and cls_only else None
        return self.encoder(x, bias_Bx1xQxL, deterministic, cls_only, at)
