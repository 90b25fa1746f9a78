"""ModernBERT's sequence classifier in Flax: transformers' PyTorch ModernBertForSequenceClassification, same math
and the same state-dict names (flaxclf.families lists it: weights, export, sharding, training and the CLI treat it
as any other family).

What ModernBERT does differently from BERT, and how this module does it:
  * no position embeddings and no token types: rotary embeddings on the queries and keys, with the global theta
    on the global layers (layer_id % global_attn_every_n_layers == 0) and the local theta on the others;
  * the local layers attend within |i - j| <= local_attention // 2 (transformers' sliding_window_mask). They run
    banded (`banded_local_attention`): the sequence is cut into blocks of that half-width and each block attends
    to itself and its two neighbours, so a layer holds [B, H, L, 3w] scores instead of [B, H, L, L];
  * pre-norm layers (layer 0 has no attention norm: HF's attn_norm is an Identity there), a fused Wqkv, a GeGLU
    feed-forward (Wi -> input, gate -> act(input) * gate -> Wo), a final norm, LayerNorms without bias unless
    norm_bias;
  * head: position 0 ("cls") or the masked mean ("mean") -> head.dense -> activation -> head.norm -> dropout ->
    classifier.
Parameters nest as the PyTorch names (params["model"]["layers"]["0"]["attn"]["Wqkv"]["kernel"]), so converting a
checkpoint is a rename of the leaf and a transpose of the Linear weights (flaxclf.weights).

`dtype` is the matmul input dtype, as in flaxclf.fast_bert: fp32 (the default) is exact; bf16 is mixed precision,
with fp32 accumulation and fp32 results, and the embeddings, norms, rotary, softmax and residual stream in fp32.
Outputs at padded positions are not HF's (a padded query far from every token has no key in its window; both
spread it evenly, over different sets): nothing real reads them, so logits, losses and gradients are the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from functools import partial
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from flaxclf.fast_bert import ACTIVATIONS, _mm

ClassifierPooling = Literal["cls", "mean"]
LocalImpl = Literal["auto", "banded", "dense"]


@dataclass(frozen=True)
class AttentionImpl:
    """How the attention is computed (the math is the same either way)."""

    local: LocalImpl = "auto"  # local layers: banded when L > 3 * window (auto), or always banded / dense
    global_chunk: int = 512  # global layers: queries per block, chunked when L is longer (0: [L, L] at once)


_NEG = float(np.finfo(np.float32).min)  # the score of a masked key, as transformers' additive masks use
_GLOBAL_OUT = "modernbert_global_attention"  # a chunked global layer's attention output, which remat keeps


@dataclass(frozen=True)
class ModernBertSpec:
    """The fields of transformers' ModernBertConfig that fix the encoder's and the head's math; defaults are that
    class's. The label count and the classifier's dropout belong to flaxclf.model.ClassifierConfig, as BERT's do."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    global_rope_theta: float = 160000.0
    local_rope_theta: float | None = 10000.0  # None: global_rope_theta (as transformers 4.x)
    global_attn_every_n_layers: int = 3
    local_attention: int = 128  # the full window width; each side sees local_attention // 2
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False  # head.dense's bias; the classifier itself always has one
    classifier_pooling: ClassifierPooling = "cls"
    classifier_activation: str = "gelu"
    hidden_activation: str = "gelu"
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    pad_token_id: int = 50283
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0

    def __post_init__(self):
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling {self.classifier_pooling!r} is not known; use 'cls' or 'mean'")
        for key in ("hidden_activation", "classifier_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ValueError(f"{key} {getattr(self, key)!r} is not known; use one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads of "
                             "an even size (rotary embeddings rotate pairs)")
        if self.global_attn_every_n_layers < 1 or self.local_attention < 0:
            raise ValueError("global_attn_every_n_layers must be >= 1 and local_attention >= 0, got "
                             f"{self.global_attn_every_n_layers}, {self.local_attention}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModernBertSpec:
        """From a config.json's fields, as transformers 4.x writes them (global_rope_theta, local_rope_theta,
        global_attn_every_n_layers) or 5.x does (rope_parameters per layer type, layer_types); a missing key takes
        ModernBertConfig's default. Rotary scaling and layer patterns other than every-n-th-global are refused."""
        if hf.get("model_type", "modernbert") != "modernbert":
            raise ValueError(f"model_type {hf['model_type']!r} is not ModernBERT")
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in hf.items() if k in known}
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported; flaxclf's ModernBERT has the "
                             "default rotary embeddings only")
        for layer_type, key in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            rope = (hf.get("rope_parameters") or {}).get(layer_type) or {}
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters[{layer_type!r}] {rope!r} is not supported; flaxclf's ModernBERT "
                                 "has the default rotary embeddings only")
            if "rope_theta" in rope:
                out[key] = rope["rope_theta"]
        types = hf.get("layer_types")
        if types:
            n = types[1:].index("full_attention") + 1 if "full_attention" in types[1:] else len(types)
            if list(types) != _layer_types(len(types), n):
                raise ValueError(f"layer_types {types} is not supported; flaxclf's ModernBERT has a global layer "
                                 "every n layers (global_attn_every_n_layers), starting at layer 0")
            out["global_attn_every_n_layers"] = n
        return cls(**out)

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """config.json's fields for this spec, which ModernBertConfig reads in transformers 4.x and 5.x alike (5.x
        turns the rope thetas and global_attn_every_n_layers into its rope_parameters and layer_types)."""
        return {"model_type": "modernbert", **asdict(self), **extra}

    @property
    def model_type(self) -> str:
        return "modernbert"

    @property
    def family(self):
        from flaxclf.families import FAMILIES

        return FAMILIES["modernbert"]

    @property
    def max_length(self) -> int:
        """The longest input: rotary positions have no table, but the checkpoint was trained up to this."""
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window(self) -> int:
        """How far a local layer's query sees on each side: |i - j| <= window."""
        return self.local_attention // 2

    def is_global(self, layer_id: int) -> bool:
        return layer_id % self.global_attn_every_n_layers == 0

    def rope_theta(self, layer_id: int) -> float:
        if self.is_global(layer_id) or self.local_rope_theta is None:
            return self.global_rope_theta
        return self.local_rope_theta


def _layer_types(layers: int, every: int) -> list[str]:
    """transformers 5.x's layer_types for a global layer every `every` layers."""
    return ["sliding_attention" if i % every else "full_attention" for i in range(layers)]


# ---------------------------------------------------------------------------------------------- attention math
def rotary(x_BxHxLxDh: jax.Array, theta: float) -> jax.Array:
    """HF's rotate-half rotary embedding at positions 0..L-1 (ModernBERT's eager/sdpa path: positions count
    padding too), computed in fp32 as transformers does."""
    n, dh = x_BxHxLxDh.shape[-2:]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
    freqs = jnp.arange(n, dtype=jnp.float32)[:, None] * inv_freq[None, :]
    angles_LxDh = jnp.concatenate([freqs, freqs], axis=-1)
    x1, x2 = jnp.split(x_BxHxLxDh, 2, axis=-1)
    return x_BxHxLxDh * jnp.cos(angles_LxDh) + jnp.concatenate([-x2, x1], axis=-1) * jnp.sin(angles_LxDh)


def _softmax_attend(q, k, v, allowed, dtype, drop):
    """softmax(q k^T / sqrt(Dh) where allowed) v over the last two axes; scores and softmax in fp32. A masked
    score becomes fp32's min (HF adds it): its weight is exactly 0 beside any allowed key."""
    scores = _mm(q, jnp.swapaxes(k, -1, -2), dtype) * (q.shape[-1] ** -0.5)
    probs = jax.nn.softmax(jnp.where(allowed, scores, _NEG), axis=-1)
    if drop is not None:
        probs = drop(probs)
    return _mm(probs, v, dtype)


def dense_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, key_mask_BxL, window: int | None = None,
                    dtype: Any = jnp.float32, drop=None) -> jax.Array:
    """Attention over every key (a global layer, window None) or within |i - j| <= window, building the [L, L]
    scores. `drop` is applied to the probabilities (attention dropout), or None."""
    n = q_BxHxLxDh.shape[2]
    allowed = key_mask_BxL.astype(bool)[:, None, None, :]
    if window is not None:
        pos = jnp.arange(n)
        allowed = allowed & (jnp.abs(pos[:, None] - pos[None, :]) <= window)
    return _softmax_attend(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, allowed, dtype, drop)


def chunked_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, key_mask_BxL, dtype: Any = jnp.float32,
                      chunk: int = 512) -> jax.Array:
    """dense_attention(..., window=None) a block of `chunk` queries at a time (lax.map), each block recomputed in
    the backward pass (jax.checkpoint): a global layer holds [B, H, chunk, L] scores, not [B, H, L, L], in the
    forward pass and in the gradient. Each query's softmax still covers every key at once, so the result is the
    dense one's (up to the order XLA sums in). No attention dropout: the caller uses the dense path for that."""
    b, h, n, dh = q_BxHxLxDh.shape
    nc = -(-n // chunk)
    q = jnp.pad(q_BxHxLxDh, ((0, 0), (0, 0), (0, nc * chunk - n), (0, 0)))
    q_NcxBxHxCxDh = q.reshape(b, h, nc, chunk, dh).transpose(2, 0, 1, 3, 4)
    allowed = key_mask_BxL.astype(bool)[:, None, None, :]

    @jax.checkpoint
    def block(q_BxHxCxDh):
        return _softmax_attend(q_BxHxCxDh, k_BxHxLxDh, v_BxHxLxDh, allowed, dtype, None)

    out = jax.lax.map(block, q_NcxBxHxCxDh)
    return out.transpose(1, 2, 0, 3, 4).reshape(b, h, nc * chunk, dh)[:, :, :n]


def _with_neighbours(x, axis: int):
    """Blocks [..., nb, c, ...] (block axis `axis`) -> [..., nb, 3c, ...]: each block preceded by the previous
    one and followed by the next (zeros beyond the ends)."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (1, 1)
    xp = jnp.pad(x, pad)
    nb = x.shape[axis]
    parts = [jax.lax.slice_in_dim(xp, i, i + nb, axis=axis) for i in range(3)]
    return jnp.concatenate(parts, axis=axis + 1)


def banded_local_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, key_mask_BxL, window: int,
                           dtype: Any = jnp.float32, drop=None) -> jax.Array:
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

    q, k, v = blocks(q_BxHxLxDh), _with_neighbours(blocks(k_BxHxLxDh), 2), _with_neighbours(blocks(v_BxHxLxDh), 2)
    keys_BxNbx3c = _with_neighbours(jnp.pad(key_mask_BxL.astype(bool), ((0, 0), (0, extra))).reshape(b, nb, c), 1)
    # Query s of a block and key t of its 3c neighbourhood are (s + c) - t positions apart, whatever the block.
    offset_Cx3c = jnp.arange(c)[:, None] + c - jnp.arange(3 * c)[None, :]
    allowed = (jnp.abs(offset_Cx3c) <= window)[None, None, None] & keys_BxNbx3c[:, None, :, None, :]
    out = _softmax_attend(q, k, v, allowed, dtype, drop)
    return out.reshape(b, h, nb * c, dh)[:, :, :n]


# ---------------------------------------------------------------------------------------------- modules
def _trunc_normal(spec: ModernBertSpec, std: float):
    """HF's init: a normal of `std` cut at +-initializer_cutoff_factor stds."""
    cut = spec.initializer_cutoff_factor
    return jax.nn.initializers.truncated_normal(std, lower=-cut, upper=cut)


class _Dense(nn.Module):
    """A torch Linear: kernel [in, out] (PyTorch's weight transposed), optional bias; fp32 result."""

    features: int
    use_bias: bool
    std: float
    spec: ModernBertSpec
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", _trunc_normal(self.spec, self.std), (x.shape[-1], self.features), jnp.float32)
        y = _mm(x, kernel, self.dtype)
        if self.use_bias:
            y = y + self.param("bias", jax.nn.initializers.zeros, (self.features,), jnp.float32)
        return y


def _norm(spec: ModernBertSpec, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance, as torch's LayerNorm: the fast E[x^2] - E[x]^2 form drifts ~1e-6 from it.
    return nn.LayerNorm(epsilon=spec.norm_eps, use_bias=spec.norm_bias, dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def _std_out(spec: ModernBertSpec) -> float:
    return spec.initializer_range / (2.0 * spec.num_hidden_layers) ** 0.5


class _Embeddings(nn.Module):
    spec: ModernBertSpec

    def setup(self):
        s = self.spec
        self.tok_embeddings = nn.Embed(s.vocab_size, s.hidden_size,
                                       embedding_init=_trunc_normal(s, s.initializer_range))
        self.norm = _norm(s)
        self.drop = nn.Dropout(s.embedding_dropout)

    def __call__(self, input_ids, deterministic: bool = True):
        x = self.tok_embeddings(input_ids.astype(jnp.int32))
        # torch's Embedding(padding_idx=pad) never updates the pad row: no gradient flows from a pad token.
        x = jnp.where((input_ids == self.spec.pad_token_id)[..., None], jax.lax.stop_gradient(x), x)
        return self.drop(self.norm(x), deterministic=deterministic)


class _Attention(nn.Module):
    spec: ModernBertSpec
    layer_id: int
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()

    def setup(self):
        s = self.spec
        self.Wqkv = _Dense(3 * s.hidden_size, s.attention_bias, s.initializer_range, s, self.dtype)
        self.Wo = _Dense(s.hidden_size, s.attention_bias, _std_out(s), s, self.dtype)
        self.attn_drop = nn.Dropout(s.attention_dropout)  # on the probabilities
        self.out_drop = nn.Dropout(s.attention_dropout)  # on Wo's output (HF: only when the rate is > 0)

    def __call__(self, x_BxLxD, key_mask_BxL, deterministic: bool = True):
        s = self.spec
        b, n, d = x_BxLxD.shape
        # HF views Wqkv's output as [B, L, 3, H, Dh].
        qkv = self.Wqkv(x_BxLxD).reshape(b, n, 3, s.num_attention_heads, s.head_dim).transpose(2, 0, 3, 1, 4)
        theta = s.rope_theta(self.layer_id)
        q, k, v = rotary(qkv[0], theta), rotary(qkv[1], theta), qkv[2]
        drop = None if deterministic or s.attention_dropout == 0.0 else \
            (lambda p: self.attn_drop(p, deterministic=False))
        if s.is_global(self.layer_id):
            chunk = self.attention.global_chunk
            if drop is None and chunk and n > chunk:
                # Named for _Layers' remat: its recomputation keeps this instead of recomputing the L^2 scores.
                out = checkpoint_name(chunked_attention(q, k, v, key_mask_BxL, self.dtype, chunk), _GLOBAL_OUT)
            else:
                out = dense_attention(q, k, v, key_mask_BxL, None, self.dtype, drop)
        elif self.attention.local == "banded" or (self.attention.local == "auto" and n > 3 * max(s.window, 1)):
            out = banded_local_attention(q, k, v, key_mask_BxL, s.window, self.dtype, drop)
        else:  # the whole sequence fits in a band's 3 blocks: the [L, L] scores are no bigger
            out = dense_attention(q, k, v, key_mask_BxL, s.window, self.dtype, drop)
        return self.out_drop(self.Wo(out.transpose(0, 2, 1, 3).reshape(b, n, d)), deterministic=deterministic)


class _MLP(nn.Module):
    spec: ModernBertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.Wi = _Dense(2 * s.intermediate_size, s.mlp_bias, s.initializer_range, s, self.dtype)
        self.Wo = _Dense(s.hidden_size, s.mlp_bias, _std_out(s), s, self.dtype)
        self.drop = nn.Dropout(s.mlp_dropout)

    def __call__(self, x, deterministic: bool = True):
        inp, gate = jnp.split(self.Wi(x), 2, axis=-1)
        h = ACTIVATIONS[self.spec.hidden_activation](inp) * gate
        return self.Wo(self.drop(h, deterministic=deterministic))


class ModernBertLayer(nn.Module):
    """One encoder layer: x + attn(attn_norm(x)), then + mlp(mlp_norm(.)); layer 0 has no attn_norm."""

    spec: ModernBertSpec
    layer_id: int
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()

    def setup(self):
        if self.layer_id != 0:
            self.attn_norm = _norm(self.spec)
        self.attn = _Attention(self.spec, self.layer_id, self.dtype, self.attention)
        self.mlp_norm = _norm(self.spec)
        self.mlp = _MLP(self.spec, self.dtype)

    def __call__(self, x_BxLxD, key_mask_BxL, deterministic: bool = True):
        h = x_BxLxD if self.layer_id == 0 else self.attn_norm(x_BxLxD)
        x_BxLxD = x_BxLxD + self.attn(h, key_mask_BxL, deterministic)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD), deterministic)


@jax.custom_vjp
def _layer_boundary(x: jax.Array) -> jax.Array:
    """x; in the backward pass its cotangent goes through a matmul by the identity (exact in fp32: each output
    is one product by 1.0 plus zeros).

    Why: the pre-norm residual stream's gradient is a chain of adds, one per layer, and XLA:CPU fuses each
    layer's residual gradient together with every later layer's contributions into one loop fusion (the
    transposed copy its weight gradients read): a 22-layer step recomputed O(layers^2) of them, and 11 layers
    at 4 x 512 spent 3.7 s of an 11.5 s step there. A dot is never fused into its consumers, so each layer's
    residual gradient is computed once (7.8 s; the matmul adds ~2% of the step's FLOPs). XLA:CPU drops
    optimization barriers before fusion, so lax.optimization_barrier does not do this (measured)."""
    return x


def _boundary_fwd(x):
    return x, None


def _boundary_bwd(_, g):
    eye = jnp.eye(g.shape[-1], dtype=g.dtype)
    return (jnp.matmul(g, eye, precision=jax.lax.Precision.HIGHEST),)


_layer_boundary.defvjp(_boundary_fwd, _boundary_bwd)


class _Layers(nn.Module):
    """The encoder layers, each output through _layer_boundary. With remat, the layers after layer 0 run as a
    lax.scan over groups of global_attn_every_n_layers layers (local ..., global: the same computation in every
    group), the group jax.checkpoint-ed: the forward pass keeps only each group's input, and the backward pass
    recomputes one group at a time inside the loop.

    Why a scan: XLA:CPU drops the optimization barriers that jax.checkpoint puts around a recomputation, and then
    schedules the recomputed forward pass early, so per-layer checkpointing held as much as none (4 layers at
    1 x 8,192: 3.51 GB of temporaries against 3.60). A loop body cannot be hoisted out of its loop. The
    recomputation keeps the chunked global layer's attention output (a [B, L, D] per group) rather than redo its
    L^2 scores a second time: they are recomputed once, block by block, in the attention's own backward pass
    (7 layers at 1 x 8,192: 75-82 s a step against 79-87 s). The parameters keep their per-layer names: each
    step stacks them for the scan (one copy of the layers' weights). Dropout in the scanned layers draws from
    keys split off the step's, not from each layer's own: a remat run's masks differ from a run without."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()
    remat: bool = False

    def setup(self):
        self.layers = [ModernBertLayer(self.spec, i, self.dtype, self.attention, name=str(i))
                       for i in range(self.spec.num_hidden_layers)]

    def __call__(self, x, key_mask, deterministic: bool = True, every_state: bool = False):
        """The layers' outputs: [input, each layer's output] with every_state, else [input, the last output] (a
        scan that returned every layer's output would keep them all)."""
        n, every = self.spec.num_hidden_layers, self.spec.global_attn_every_n_layers
        groups = (n - 1) // every if self.remat and not self.is_initializing() else 0
        states = [x]
        states.append(_layer_boundary(self.layers[0](x, key_mask, deterministic)))
        if groups:
            states.extend(self._scanned(states[-1], key_mask, deterministic, groups, every_state))
        for layer in self.layers[1 + groups * every:]:
            states.append(_layer_boundary(layer(states[-1], key_mask, deterministic)))
        return states if every_state else [x, states[-1]]

    def _scanned(self, x, key_mask, deterministic: bool, groups: int, every_state: bool) -> list:
        """Layers 1 .. groups * every as a checkpointed scan over groups: each layer's output in order
        (every_state), or the last one."""
        every = self.spec.global_attn_every_n_layers
        params = self.variables["params"]
        # Layer j + 1's module computes position j of every group (the same attention kind and rotary theta).
        template = [ModernBertLayer(self.spec, j + 1, self.dtype, self.attention, parent=None) for j in range(every)]
        stacked = [jax.tree.map(lambda *ps: jnp.stack(ps), *(params[str(g * every + j + 1)] for g in range(groups)))
                   for j in range(every)]
        drops = not deterministic and (self.spec.attention_dropout > 0 or self.spec.mlp_dropout > 0)
        keys = jax.random.split(self.make_rng("dropout"), groups) if drops else jnp.zeros(groups, jnp.uint32)

        @partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(_GLOBAL_OUT))
        def group(x, xs):
            layer_params, key = xs
            outs = []
            for j in range(every):
                rngs = {"dropout": jax.random.fold_in(key, j)} if drops else None
                x = _layer_boundary(template[j].apply({"params": layer_params[j]}, x, key_mask, deterministic,
                                                      rngs=rngs))
                outs.append(x)
            return x, jnp.stack(outs) if every_state else None

        x, outs = jax.lax.scan(group, x, (stacked, keys))
        return [outs[g, j] for g in range(groups) for j in range(every)] if every_state else [x]


class _Model(nn.Module):
    """ModernBertModel: embeddings -> layers -> final_norm."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()
    remat: bool = False

    def setup(self):
        self.embeddings = _Embeddings(self.spec)
        self.layers = _Layers(self.spec, self.dtype, self.attention, self.remat)
        self.final_norm = _norm(self.spec)

    def __call__(self, input_ids, attention_mask, deterministic: bool = True, every_state: bool = False):
        """(final hidden states [B, L, D], the embeddings and each layer's output: HF's hidden_states with
        every_state, else the embeddings and the last layer's)."""
        states = self.layers(self.embeddings(input_ids, deterministic), attention_mask > 0, deterministic,
                             every_state)
        return self.final_norm(states[-1]), tuple(states)


class _Head(nn.Module):
    """ModernBertPredictionHead: norm(act(dense(x)))."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = _Dense(s.hidden_size, s.classifier_bias, _std_out(s), s, self.dtype)
        self.norm = _norm(s)

    def __call__(self, x):
        return self.norm(ACTIVATIONS[self.spec.classifier_activation](self.dense(x)))


def pool(hidden_BxLxD: jax.Array, attention_mask_BxL: jax.Array, pooling: ClassifierPooling) -> jax.Array:
    """Position 0 ("cls"), or the mean over real tokens ("mean"; an all-padding row gives 0, not NaN)."""
    if pooling == "cls":
        return hidden_BxLxD[:, 0]
    m = attention_mask_BxL[..., None].astype(jnp.float32)
    return (hidden_BxLxD * m).sum(1) / jnp.maximum(m.sum(1), 1.0)


class ModernBertClassifier(nn.Module):
    """ModernBertForSequenceClassification in Flax; logits [B, num_labels] in fp32 whatever the compute dtype.

    The same interface as flaxclf.model.BertClassifier (the train and eval steps, predict and inspect use either):
    `config` is a ClassifierConfig whose backbone is a ModernBertSpec; token_type_ids are accepted and ignored,
    as ModernBERT has none."""

    config: Any  # flaxclf.model.ClassifierConfig
    dtype: Any = jnp.float32  # matmul input dtype; parameters keep their own
    remat: bool = False  # gradient checkpointing of each layer
    impl: str = "fast"  # flaxclf's own; transformers never had a Flax ModernBERT
    attention: AttentionImpl = AttentionImpl()

    def setup(self):
        s = self.config.backbone
        self.model = _Model(s, self.dtype, self.attention, self.remat)
        self.head = _Head(s, self.dtype)
        self.drop = nn.Dropout(self.config.dropout_rate)
        self.classifier = _Dense(self.config.num_labels, True, s.hidden_size ** -0.5, s, self.dtype)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True):
        hidden = self.encode(input_ids, attention_mask, deterministic=deterministic)
        return self.classify(hidden, attention_mask, deterministic=deterministic)

    def encode(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
               cls_only: bool = False):
        """The final hidden states after final_norm, [B, L, D] (every position: the last layer's attention needs
        them all, so cls_only changes nothing)."""
        return self.model(input_ids, attention_mask, deterministic)[0]

    def hidden_states(self, input_ids, attention_mask):
        """HF's output_hidden_states: the embeddings' and each layer's output (before final_norm)."""
        return self.model(input_ids, attention_mask, True, every_state=True)[1]

    def classify(self, hidden_BxLxD, attention_mask, *, deterministic: bool = True):
        """From final hidden states to fp32 logits: pooling -> prediction head -> dropout -> classifier."""
        x = self.head(pool(hidden_BxLxD, attention_mask, self.config.backbone.classifier_pooling))
        return self.classifier(self.drop(x, deterministic=deterministic)).astype(jnp.float32)
