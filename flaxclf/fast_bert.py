"""A BERT encoder with the parameter tree, initial values and dropout masks of transformers' FlaxBertModule
(add_pooling_layer=False), laid out for speed on XLA.

Same math as FlaxBertModule, in fp32 to the last bit of the dropout masks; what differs is the layout:
  * query, key and value are one matmul against the three kernels concatenated at apply time ([D, 3D]), so the
    activations are read once instead of three times (the parameters keep their three HF names);
  * heads are moved ahead of the sequence once ([B, L, 3, H, Dh] -> [3, B, H, L, Dh]), so both attention
    matmuls are plain batched GEMMs over B*H contiguous [L, Dh] blocks; FlaxBertSelfAttention's einsums
    ('...qhd,...khd->...hqk') make XLA:CPU copy operands into that layout inside every dot, forward and backward;
  * the padding bias [B, 1, 1, L] is built once per forward pass instead of once per layer.
Parameter names, initializers and the order of `make_rng` calls follow transformers' modules so that
`init` gives the same values and dropout draws the same masks (checked in tests/test_bench_smoke.py).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.backbone import BertSpec

_ACTIVATIONS = {
    "gelu": lambda x: nn.gelu(x, approximate=False),  # as PyTorch's exact GELU (erf)
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}


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
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.word_embeddings = nn.Embed(s.vocab_size, s.hidden_size, embedding_init=_normal(s), dtype=self.dtype)
        self.position_embeddings = nn.Embed(s.max_position_embeddings, s.hidden_size, embedding_init=_normal(s),
                                            dtype=self.dtype)
        self.token_type_embeddings = nn.Embed(s.type_vocab_size, s.hidden_size, embedding_init=_normal(s),
                                              dtype=self.dtype)
        self.LayerNorm = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=self.dtype)
        self.dropout = nn.Dropout(rate=s.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, position_ids, deterministic: bool = True):
        x = (self.word_embeddings(input_ids.astype("i4")) + self.token_type_embeddings(token_type_ids.astype("i4"))
             + self.position_embeddings(position_ids.astype("i4")))
        return self.dropout(self.LayerNorm(x), deterministic=deterministic)


class SelfAttention(nn.Module):
    """Fused-QKV, heads-major attention; params attention/self/{query,key,value}/{kernel,bias}."""

    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        d = self.spec.hidden_size
        self.query = _DenseParams(d, d, _normal(self.spec))
        self.key = _DenseParams(d, d, _normal(self.spec))
        self.value = _DenseParams(d, d, _normal(self.spec))

    def __call__(self, x_BxLxD, bias_Bx1x1xL, deterministic: bool = True):
        s = self.spec
        b, n, d = x_BxLxD.shape
        h = s.num_attention_heads
        dh = d // h
        (wq, bq), (wk, bk), (wv, bv) = self.query(), self.key(), self.value()
        w = jnp.concatenate([wq, wk, wv], axis=1).astype(self.dtype)
        bias = jnp.concatenate([bq, bk, bv]).astype(self.dtype)
        qkv = jnp.dot(x_BxLxD.astype(self.dtype), w) + bias  # [B, L, 3D]
        qkv_3xBxHxLxDh = qkv.reshape(b, n, 3, h, dh).transpose(2, 0, 3, 1, 4)
        q, k, v = qkv_3xBxHxLxDh[0], qkv_3xBxHxLxDh[1], qkv_3xBxHxLxDh[2]
        q = q / jnp.sqrt(dh).astype(self.dtype)  # scaled before the product, as flax's attention does
        scores_BxHxLxL = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) + bias_Bx1x1xL.astype(self.dtype)
        probs = jax.nn.softmax(scores_BxHxLxL).astype(self.dtype)
        rate = s.attention_probs_dropout_prob
        if not deterministic and rate > 0.0:
            # flax's dot_product_attention_weights(broadcast_dropout=True): one [L, L] mask for all rows/heads.
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - rate, (1, 1, n, n))
            probs = probs * (keep.astype(self.dtype) / jnp.asarray(1.0 - rate, self.dtype))
        ctx_BxHxLxDh = jnp.matmul(probs, v)
        return ctx_BxHxLxDh.transpose(0, 2, 1, 3).reshape(b, n, d)


class _DenseDropoutNorm(nn.Module):
    """dense -> dropout -> LayerNorm(. + residual): FlaxBertSelfOutput and FlaxBertOutput."""

    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = nn.Dense(s.hidden_size, kernel_init=_normal(s), dtype=self.dtype)
        self.LayerNorm = nn.LayerNorm(epsilon=s.layer_norm_eps, dtype=self.dtype)
        self.dropout = nn.Dropout(rate=s.hidden_dropout_prob)

    def __call__(self, x, residual, deterministic: bool = True):
        return self.LayerNorm(self.dropout(self.dense(x), deterministic=deterministic) + residual)


class Attention(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.self = SelfAttention(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, dtype=self.dtype)

    def __call__(self, x, bias, deterministic: bool = True):
        return self.output(self.self(x, bias, deterministic), x, deterministic)


class Intermediate(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.dense = nn.Dense(self.spec.intermediate_size, kernel_init=_normal(self.spec), dtype=self.dtype)

    def __call__(self, x):
        return _ACTIVATIONS[self.spec.hidden_act](self.dense(x))


class Layer(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32

    def setup(self):
        self.attention = Attention(self.spec, dtype=self.dtype)
        self.intermediate = Intermediate(self.spec, dtype=self.dtype)
        self.output = _DenseDropoutNorm(self.spec, dtype=self.dtype)

    def __call__(self, x, bias, deterministic: bool = True):
        a = self.attention(x, bias, deterministic)
        return self.output(self.intermediate(a), a, deterministic)


class _Layers(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cls = nn.remat(Layer, static_argnums=(3,)) if self.remat else Layer
        self.layers = [cls(self.spec, dtype=self.dtype, name=str(i)) for i in range(self.spec.num_hidden_layers)]

    def __call__(self, x, bias, deterministic: bool = True):
        for layer in self.layers:
            x = layer(x, bias, deterministic)
        return x


class Encoder(nn.Module):
    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        self.layer = _Layers(self.spec, dtype=self.dtype, remat=self.remat)

    def __call__(self, x, bias, deterministic: bool = True):
        return self.layer(x, bias, deterministic)


class FastBertModule(nn.Module):
    """FlaxBertModule(add_pooling_layer=False) with the same params; returns the final hidden states [B, L, D]."""

    spec: BertSpec
    dtype: Any = jnp.float32
    remat: bool = False  # gradient checkpointing of each layer

    def setup(self):
        self.embeddings = Embeddings(self.spec, dtype=self.dtype)
        self.encoder = Encoder(self.spec, dtype=self.dtype, remat=self.remat)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True):
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1]), input_ids.shape)
        x = self.embeddings(input_ids, token_type_ids, position_ids, deterministic)
        neg = jnp.finfo(self.dtype).min  # as FlaxBertSelfAttention's bias: 0 on tokens, dtype's min on padding
        bias_Bx1x1xL = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, neg).astype(self.dtype)
        return self.encoder(x, bias_Bx1x1xL, deterministic)
