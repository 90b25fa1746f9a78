"""A BERT encoder with the parameter tree, initial values and dropout masks of transformers' FlaxBertModule
(add_pooling_layer=False), laid out for speed on XLA.

Same math as FlaxBertModule, in fp32 to the last bit of the dropout masks; what differs is the layout:
  * each of query, key and value moves its heads ahead of the sequence once, right after its projection
    ([B, L, H, Dh] -> [B, H, L, Dh]), so both attention matmuls are plain batched GEMMs over B*H contiguous
    [L, Dh] blocks; FlaxBertSelfAttention's einsums ('...qhd,...khd->...hqk') make XLA:CPU copy operands into
    that layout inside every dot, forward and backward. (One matmul against the three kernels concatenated,
    then one [B, L, 3, H, Dh] -> [3, B, H, L, Dh] transpose, made the backward pass copy the stacked gradient
    twice: the MiniLM train step was ~4% slower that way);
  * the padding bias [B, 1, 1, L] is built once per forward pass instead of once per layer;
  * softmax(s) @ v is computed as (exp(s - max) @ v) / sum (with dropout: (exp(s - max) * mask) @ v / (sum *
    keep_prob)), which XLA:CPU fuses into the second matmul instead of writing and re-reading the [B, H, L, L]
    probabilities;
  * the exact GELU uses torch's erf formula behind a select that keeps it out of the next matmul's fusion;
  * with cls_only=True (the classifier's [CLS] poolings) the last layer computes position 0 alone, and
    attends from it without projecting keys or values (_cls_attention).
`dtype` is the matmul input dtype. fp32 (the default) is exact. bf16 is mixed precision, as torch's autocast:
matmul inputs in bf16 with fp32 accumulation and an fp32 result; embeddings, LayerNorm, GELU, softmax, dropout
and the residual stream stay fp32. On this CPU (AVX-512 bf16) a bf16 dot that returns fp32 runs ~2x faster
than an fp32 one, while a dot that returns bf16 runs no faster than fp32 (bench/README.md).
Parameter names, initializers and the order of `make_rng` calls follow transformers' modules so that
`init` gives the same values and dropout draws the same masks (checked in tests/test_fast_bert.py).
The same encoder serves every family of flaxclf.families: what a family changes (token types, RoBERTa's
positions, a factorized embedding with its projection, the dropouts after the attention and feed-forward
outputs, ALBERT's weights shared across layer positions) is read from its spec, not coded as another encoder.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.backbone import BertSpec


def _gelu_erf(x: jax.Array) -> jax.Array:
    """PyTorch's exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))), with the same formula.

    The select is there for XLA:CPU's fusion, not the math: below -6 the value is under 6e-9 in magnitude
    (erf's fp32 result is -1 there, so the formula gives 0 or -4e-8 depending on erf's clamp). YNNPACK's dot
    fusions absorb the elementwise producers of a matmul operand and run them as separate passes over memory;
    without a select (which YNNPACK does not take) the GELU, or its last multiplies for flax's erfc form, become
    part of the next layer's matmul and the MiniLM inference step runs ~20% slower (bench/README.md).
    """
    return jnp.where(x > -6.0, x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476)), 0.0)


ACTIVATIONS = {
    "gelu": _gelu_erf,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


def _mm(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w with both operands in the compute dtype, accumulated and returned in fp32. w is [K, N] (a dense
    kernel) or batched like x (attention).

    The backward pass is written out (custom_vjp) rather than left to JAX's transpose rule, for two measured
    reasons (bench/README.md): in bf16, JAX's rule multiplies the fp32 cotangent by the bf16 operand in fp32,
    so two thirds of the step's matmuls would gain nothing (torch's autocast runs them in bf16 too); in fp32,
    the rule's [B, L, D]-batched contractions make XLA:CPU copy activations into transposed layouts, and the
    explicit 2-D matmuls below make the MiniLM train step ~10% faster with the same math.
    """
    return _mm_vjp(x, w, (jnp.dtype(dtype), x.dtype, w.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mm_vjp(x, w, dtypes):
    return jnp.matmul(x.astype(dtypes[0]), w.astype(dtypes[0]), preferred_element_type=jnp.float32)


def _mm_fwd(x, w, dtypes):
    xc, wc = x.astype(dtypes[0]), w.astype(dtypes[0])
    return jnp.matmul(xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _mm_bwd(dtypes, res, g):
    """Gradients accumulated in fp32 from compute-dtype operands, returned in the operands' own dtypes."""
    (xc, wc), gc = res, g.astype(dtypes[0])
    dx = jnp.matmul(gc, jnp.swapaxes(wc, -1, -2), preferred_element_type=jnp.float32)
    if wc.ndim == 2:  # dense kernel: sum over every leading dimension of x
        dw = jnp.matmul(xc.reshape(-1, xc.shape[-1]).T, gc.reshape(-1, gc.shape[-1]),
                        preferred_element_type=jnp.float32)
    else:
        dw = jnp.matmul(jnp.swapaxes(xc, -1, -2), gc, preferred_element_type=jnp.float32)
    return dx.astype(dtypes[1]), dw.astype(dtypes[2])


_mm_vjp.defvjp(_mm_fwd, _mm_bwd)


def _normal(spec: BertSpec):
    return jax.nn.initializers.normal(spec.initializer_range)


class _DenseParams(nn.Module):
    """Only the kernel [in, out] and bias [out] of an nn.Dense (same names, initializers and rng order)."""

    features: int
    in_features: int
    kernel_init: Any

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array]:
        kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features), jnp.float32)
        bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), jnp.float32)
        return kernel, bias


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
        self.dropout = nn.Dropout(rate=s.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        x = self.word_embeddings(input_ids.astype("i4"))
        if self.spec.family.token_types:
            x = x + self.token_type_embeddings(token_type_ids.astype("i4"))
        x = x + self.position_embeddings(position_ids.astype("i4"))
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


def _cls_attention(x_BxLxD, q_BxHxDh, bias_Bx1xL, keep, rate, key, value, dtype):
    """Attention of the [CLS] query alone, without projecting a key or a value: the same sums regrouped.
    Its score against position j is q . (x_j Wk + bk) = (Wk q) . x_j + q . bk, and its output
    sum_j p_j (x_j Wv + bv) = (sum_j p_j x_j) Wv + (sum_j p_j) bv, per head. So the query goes through Wk
    (B*H*D*Dh multiply-adds) instead of every position (B*L*D*D), and the weights mix x before Wv; for
    MiniLM at length 128 the last layer's two [L, D] x [D, D] projections (3% of the model's FLOPs) go.
    `keep` is the attention dropout mask's [CLS] row (None without dropout). Returns [B, 1, D]."""
    b, _, d = x_BxLxD.shape
    _, h, dh = q_BxHxDh.shape
    (wk, bk), (wv, bv) = key, value
    wk_HxDhxD = wk.reshape(d, h, dh).transpose(1, 2, 0)
    qk_BxHxD = _mm(q_BxHxDh.transpose(1, 0, 2), wk_HxDhxD, dtype).transpose(1, 0, 2)
    qb_BxHx1 = jnp.sum(q_BxHxDh * bk.reshape(h, dh), -1, keepdims=True)
    scores_BxHxL = _mm(qk_BxHxD, jnp.swapaxes(x_BxLxD, -1, -2), dtype) + qb_BxHx1 + bias_Bx1xL
    e = jnp.exp(scores_BxHxL - jax.lax.stop_gradient(scores_BxHxL.max(-1, keepdims=True)))
    total = e.sum(-1, keepdims=True)
    if keep is not None:
        e = e * keep[:, :, 0].astype(e.dtype)
        total = total * (1.0 - rate)
    mixed_HxBxD = _mm(e, x_BxLxD, dtype).transpose(1, 0, 2)  # sum_j e_j x_j per head
    ctx_HxBxDh = _mm(mixed_HxBxD, wv.reshape(d, h, dh).transpose(1, 0, 2), dtype)
    # + (sum_j e_j) bv, then divided by the softmax's sum (times keep_prob with dropout)
    ctx_BxHxDh = (ctx_HxBxDh.transpose(1, 0, 2) + e.sum(-1, keepdims=True) * bv.reshape(h, dh)) / total
    return ctx_BxHxDh.reshape(b, 1, d)


class SelfAttention(nn.Module):
    """Heads-major attention; params attention/self/{query,key,value}/{kernel,bias}."""

    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        d = self.spec.hidden_size
        self.query = _DenseParams(d, d, _normal(self.spec))
        self.key = _DenseParams(d, d, _normal(self.spec))
        self.value = _DenseParams(d, d, _normal(self.spec))

    def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool = True, cls_only: bool = False):
        s = self.spec
        b, n, d = x_BxLxD.shape
        h = s.num_attention_heads
        dh = d // h
        (wq, bq), (wk, bk), (wv, bv) = self.query(), self.key(), self.value()
        dt = self.dtype

        def heads(rows_BxRxD, w, bias):  # [B, R, D] -> [B, H, R, Dh]: heads ahead of the sequence, once
            r = rows_BxRxD.shape[1]
            return (_mm(rows_BxRxD, w, dt) + bias).reshape(b, r, h, dh).transpose(0, 2, 1, 3)

        q = heads(x_BxLxD[:, :1] if cls_only else x_BxLxD, wq, bq)
        q = q / jnp.sqrt(dh).astype(q.dtype)  # scaled before the product, as flax's attention does
        rate = s.attention_probs_dropout_prob
        keep = None
        if not deterministic and rate > 0.0:
            # flax's dot_product_attention_weights(broadcast_dropout=True): one [L, L] mask for all rows/heads;
            # the cls_only path takes its first row, so both paths drop the same weights.
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (1, 1, n, n))[:, :, :q.shape[2]]
        if cls_only:
            return _cls_attention(x_BxLxD, q[:, :, 0], bias_Bx1x1xL[:, :, 0], keep, rate, (wk, bk), (wv, bv), dt)
        k, v = heads(x_BxLxD, wk, bk), heads(x_BxLxD, wv, bv)
        scores_BxHxQxL = _mm(q, jnp.swapaxes(k, -1, -2), dt) + bias_Bx1x1xL
        # softmax(s) @ v as (exp(s - max) @ v) / sum: XLA:CPU fuses the exponential (and the dropout mask) into
        # the second matmul instead of writing and re-reading the [B, H, L, L] probabilities (3x faster at
        # 64 x 128 in inference, ~3% off the MiniLM train step).
        e = jnp.exp(scores_BxHxQxL - jax.lax.stop_gradient(scores_BxHxQxL.max(-1, keepdims=True)))
        if keep is None:
            ctx_BxHxQxDh = _mm(e, v, dt) / e.sum(-1, keepdims=True)
        else:
            ctx_BxHxQxDh = _mm(e * keep.astype(e.dtype), v, dt) / (e.sum(-1, keepdims=True) * (1.0 - rate))
        return ctx_BxHxQxDh.transpose(0, 2, 1, 3).reshape(b, n, d)


class _Dropout(nn.Module):
    """nn.Dropout (same rng stream, same mask bits) that can keep only the first rows of a mask drawn for
    `rows` positions: the cls_only layer drops exactly what the full layer drops at position 0."""

    rate: float

    @nn.compact
    def __call__(self, x, deterministic: bool, rows: int | None = None):
        if deterministic or self.rate == 0.0:
            return x
        keep_prob = 1.0 - self.rate
        shape = x.shape if rows is None else (x.shape[0], rows, *x.shape[2:])
        keep = jax.random.bernoulli(self.make_rng("dropout"), p=keep_prob, shape=shape)[:, :x.shape[1]]
        return jax.lax.select(keep, x / keep_prob, jnp.zeros_like(x))


class _DenseDropoutNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): FlaxBertSelfOutput and FlaxBertOutput. Families without
    that dropout (DistilBERT after attention, ALBERT after the feed-forward) set `has_dropout` False."""

    spec: BertSpec
    in_features: int
    dtype: Any = jnp.float32
    has_dropout: bool = True

    def setup(self):
        s = self.spec
        self.dense = _DenseParams(s.hidden_size, self.in_features, _normal(s))
        self.LayerNorm = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=jnp.float32)
        # Named "dropout" as in transformers' modules: flax folds the module path into the mask's rng.
        self.dropout = _Dropout(rate=s.hidden_dropout_prob if self.has_dropout else 0.0)

    def __call__(self, x, residual, deterministic: bool = True, rows: int | None = None):
        w, bias = self.dense()
        return self.LayerNorm(self.dropout(_mm(x, w, self.dtype) + bias, deterministic, rows) + residual)


class Attention(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.self = SelfAttention(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.hidden_size, dtype=self.dtype,
                                        has_dropout=self.spec.family.attention_output_dropout)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False):
        rows = x.shape[1] if cls_only else None
        residual = x[:, :1] if cls_only else x
        return self.output(self.self(x, bias, deterministic, cls_only), residual, deterministic, rows)


class Intermediate(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = _DenseParams(s.intermediate_size, s.hidden_size, _normal(s))

    def __call__(self, x):
        w, bias = self.dense()
        return ACTIVATIONS[self.spec.hidden_act](_mm(x, w, self.dtype) + bias)


class Layer(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.attention = Attention(self.spec, dtype=self.dtype)
        self.intermediate = Intermediate(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, self.spec.intermediate_size, dtype=self.dtype,
                                        has_dropout=self.spec.family.ffn_output_dropout)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False):
        a = self.attention(x, bias, deterministic, cls_only)
        return self.output(self.intermediate(a), a, deterministic, x.shape[1] if cls_only else None)


class _Layers(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cls = nn.remat(Layer, static_argnums=(3, 4)) if self.remat else Layer
        # One module per weight set; ALBERT's positions share theirs (spec.layer_params).
        self.layers = [cls(self.spec, dtype=self.dtype, name=str(k)) for k in sorted(set(self.spec.layer_params()))]

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False):
        order = self.spec.layer_params()
        for i, k in enumerate(order):
            x = self.layers[k](x, bias, deterministic, cls_only and i == len(order) - 1)
        return x


class Encoder(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.layer = _Layers(self.spec, dtype=self.dtype, remat=self.remat)

    def __call__(self, x, bias, deterministic: bool = True, cls_only: bool = False):
        return self.layer(x, bias, deterministic, cls_only)


class FastBertModule(nn.Module):
    """FlaxBertModule(add_pooling_layer=False) with the same params; returns the final hidden states [B, L, D],
    or with cls_only=True those of position 0 alone, [B, 1, D]: the last layer then computes the one query row
    that [CLS] pooling reads, and attends over every position without projecting their keys and values: about
    1/L of its work."""

    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False  # gradient checkpointing of each layer

    def setup(self):
        s = self.spec
        self.embeddings = Embeddings(s)
        if s.projects_embeddings:  # ELECTRA's embeddings_project, ALBERT's embedding_hidden_mapping_in
            self.embeddings_project = _DenseParams(s.hidden_size, s.embedding_width, _normal(s))
        self.encoder = Encoder(s, dtype=self.dtype, remat=self.remat)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
                 cls_only: bool = False):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        if self.spec.family.positions_from_padding:  # RoBERTa: pad + 1, pad + 2, ... on tokens, pad on padding
            real = (input_ids != self.spec.pad_token_id).astype(jnp.int32)
            position_ids = jnp.cumsum(real, axis=-1) * real + self.spec.pad_token_id
        else:
            position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
        if self.spec.projects_embeddings:
            w, b = self.embeddings_project()
            x = _mm(x, w, self.dtype) + b
        # As FlaxBertSelfAttention's bias: 0 on tokens, the dtype's min on padding (fp32: scores stay fp32).
        bias_Bx1x1xL = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min)
        return self.encoder(x, bias_Bx1x1xL, deterministic, cls_only)
