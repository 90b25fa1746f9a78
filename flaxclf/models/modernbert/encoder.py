"""ModernBERT's encoder in Flax: transformers' PyTorch ModernBertModel, same math and the same state-dict names
(its classifier: flaxclf.models.modernbert.classifier).

What ModernBERT does differently from BERT, and how this module does it:
  * no position embeddings and no token types: rotary embeddings on the queries and keys, with the global theta
    on the global layers (layer_id % global_attn_every_n_layers == 0) and the local theta on the others;
  * the local layers attend within |i - j| <= local_attention // 2 (transformers' sliding_window_mask). They run
    banded (flaxclf.nn.attention.banded_local_attention): the sequence is cut into blocks of that half-width and
    each block attends to itself and its two neighbours, so a layer holds [B, H, L, 3w] scores instead of [B, H, L, L];
  * pre-norm layers (layer 0 has no attention norm: HF's attn_norm is an Identity there), a fused Wqkv, a GeGLU
    feed-forward (Wi -> input, gate -> act(input) * gate -> Wo), a final norm, LayerNorms without bias unless
    norm_bias;
  * head: position 0 ("cls") or the masked mean ("mean") -> head.dense -> activation -> head.norm -> dropout ->
    classifier.
Parameters nest as the PyTorch names (params["model"]["layers"]["0"]["attn"]["Wqkv"]["kernel"]), so converting a
checkpoint is a rename of the leaf and a transpose of the Linear weights (flaxclf.hf.weights).

`dtype` is the matmul input dtype, as in flaxclf.models.bert.encoder: fp32 (the default) is exact; bf16 is mixed
precision, with fp32 accumulation and fp32 results, and the embeddings, norms, rotary, softmax and residual stream
in fp32.
Packed rows (segments=S: the mask holds each token's text, flaxclf.nn.segments) rotate each text's queries and
keys by its own positions and keep every layer's attention, global or within the window, inside the text: each
text's outputs are those it has alone in a row.
Outputs at padded positions are not HF's (a padded query far from every token has no key in its window; both
spread it evenly, over different sets): nothing real reads them, so logits, losses and gradients are the same.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from flaxclf.models.modernbert.spec import AttentionImpl, ModernBertSpec
from flaxclf.nn import lora
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.attention import banded_local_attention, chunked_attention, dense_attention
from flaxclf.nn.dense import Dense
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.rotary import rotary
from flaxclf.nn.segments import positions

_GLOBAL_OUT = "modernbert_global_attention"  # a chunked global layer's attention output, which remat keeps


# ---------------------------------------------------------------------------------------------- modules
def _trunc_normal(spec: ModernBertSpec, std: float):
    """HF's init: a normal of `std` cut at +-initializer_cutoff_factor stds."""
    cut = spec.initializer_cutoff_factor
    return jax.nn.initializers.truncated_normal(std, lower=-cut, upper=cut)


def dense(spec: ModernBertSpec, in_features: int, features: int, use_bias: bool, std: float,
          dtype: Any) -> Dense:
    """A torch Linear with HF's truncated-normal init of `std`."""
    return Dense(in_features, features, _trunc_normal(spec, std), use_bias, dtype)


def norm(spec: ModernBertSpec, name: str | None = None) -> nn.LayerNorm:
    # Two-pass variance, as torch's LayerNorm: the fast E[x^2] - E[x]^2 form drifts ~1e-6 from it.
    return nn.LayerNorm(epsilon=spec.norm_eps, use_bias=spec.norm_bias, dtype=jnp.float32,
                        use_fast_variance=False, name=name)


def std_out(spec: ModernBertSpec) -> float:
    return spec.initializer_range / (2.0 * spec.num_hidden_layers) ** 0.5


class _Embeddings(nn.Module):
    spec: ModernBertSpec

    def setup(self):
        s = self.spec
        self.tok_embeddings = nn.Embed(s.vocab_size, s.hidden_size,
                                       embedding_init=_trunc_normal(s, s.initializer_range))
        self.norm = norm(s)
        self.drop = Dropout(s.embedding_dropout)

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
        self.Wqkv = dense(s, s.hidden_size, 3 * s.hidden_size, s.attention_bias, s.initializer_range, self.dtype)
        self.Wo = dense(s, s.hidden_size, s.hidden_size, s.attention_bias, std_out(s), self.dtype)
        self.attn_drop = Dropout(s.attention_dropout)  # on the probabilities
        self.out_drop = Dropout(s.attention_dropout)  # on Wo's output (HF: only when the rate is > 0)

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool = True, pos_BxL=None):
        """`mask`: the 0/1 key mask, or with `pos` (each token's position in its text) a packed row's segment
        ids."""
        s = self.spec
        b, n, d = x_BxLxD.shape
        packed = pos_BxL is not None
        # HF views Wqkv's output as [B, L, 3, H, Dh].
        qkv = self.Wqkv(x_BxLxD).reshape(b, n, 3, s.num_attention_heads, s.head_dim).transpose(2, 0, 3, 1, 4)
        theta = s.rope_theta(self.layer_id)
        q, k, v = rotary(qkv[0], theta, pos_BxL), rotary(qkv[1], theta, pos_BxL), qkv[2]
        drop = None if deterministic or s.attention_dropout == 0.0 else \
            (lambda p: self.attn_drop(p, deterministic=False))
        if s.is_global(self.layer_id):
            chunk = self.attention.global_chunk
            if drop is None and chunk and n > chunk:
                # Named for _Layers' remat: its recomputation keeps this instead of recomputing the L^2 scores.
                out = checkpoint_name(chunked_attention(q, k, v, mask_BxL, self.dtype, chunk, packed), _GLOBAL_OUT)
            else:
                out = dense_attention(q, k, v, mask_BxL, None, self.dtype, drop, packed)
        elif self.attention.local == "banded" or (self.attention.local == "auto" and n > 3 * max(s.window, 1)):
            out = banded_local_attention(q, k, v, mask_BxL, s.window, self.dtype, drop, packed)
        else:  # the whole sequence fits in a band's 3 blocks: the [L, L] scores are no bigger
            out = dense_attention(q, k, v, mask_BxL, s.window, self.dtype, drop, packed)
        return self.out_drop(self.Wo(out.transpose(0, 2, 1, 3).reshape(b, n, d)), deterministic=deterministic)


class _MLP(nn.Module):
    spec: ModernBertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.Wi = dense(s, s.hidden_size, 2 * s.intermediate_size, s.mlp_bias, s.initializer_range, self.dtype)
        self.Wo = dense(s, s.intermediate_size, s.hidden_size, s.mlp_bias, std_out(s), self.dtype)
        self.drop = Dropout(s.mlp_dropout)

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
            self.attn_norm = norm(self.spec)
        self.attn = _Attention(self.spec, self.layer_id, self.dtype, self.attention)
        self.mlp_norm = norm(self.spec)
        self.mlp = _MLP(self.spec, self.dtype)

    def __call__(self, x_BxLxD, mask_BxL, deterministic: bool = True, pos_BxL=None):
        h = x_BxLxD if self.layer_id == 0 else self.attn_norm(x_BxLxD)
        x_BxLxD = x_BxLxD + self.attn(h, mask_BxL, deterministic, pos_BxL)
        return x_BxLxD + self.mlp(self.mlp_norm(x_BxLxD), deterministic)


@jax.custom_vjp
def _layer_boundary(x: jax.Array) -> jax.Array:
    """x; in the backward pass its cotangent goes through a matmul by the identity (exact in fp32: each output
    is one product by 1.0 plus zeros).

    Why: the pre-norm residual stream's gradient is a chain of adds, one per layer, and XLA:CPU fuses each
    layer's residual gradient together with every later layer's contributions into one loop fusion (the
    transposed copy its weight gradients read), so a step recomputed O(layers^2) of them. A dot is never fused
    into its consumers, so each layer's residual gradient is computed once, for a matmul of a few percent of the
    step's FLOPs. XLA:CPU drops optimization barriers before fusion, so lax.optimization_barrier does not do
    this. Measured in bench/README.md ("ModernBERT's layer boundary")."""
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
    schedules the recomputed forward pass early, so per-layer checkpointing held about as much as none. A loop
    body cannot be hoisted out of its loop. The recomputation keeps the chunked global layer's attention output
    (a [B, L, D] per group) rather than redo its L^2 scores a second time: they are recomputed once, block by
    block, in the attention's own backward pass (bench/README.md, "ModernBERT's remat"). The parameters keep their
    per-layer names: each
    step stacks them for the scan (one copy of the layers' weights). Dropout in the scanned layers draws from
    keys split off the step's, not from each layer's own: a remat run's masks differ from a run without."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()
    remat: bool = False

    def setup(self):
        self.layers = [ModernBertLayer(self.spec, i, self.dtype, self.attention, name=str(i))
                       for i in range(self.spec.num_hidden_layers)]

    def __call__(self, x, mask, deterministic: bool = True, every_state: bool = False, pos=None):
        """The layers' outputs: [input, each layer's output] with every_state, else [input, the last output] (a
        scan that returned every layer's output would keep them all)."""
        n, every = self.spec.num_hidden_layers, self.spec.global_attn_every_n_layers
        groups = (n - 1) // every if self.remat and not self.is_initializing() else 0
        states = [x]
        states.append(_layer_boundary(self.layers[0](x, mask, deterministic, pos)))
        if groups:
            states.extend(self._scanned(states[-1], mask, deterministic, groups, every_state, pos))
        for layer in self.layers[1 + groups * every:]:
            states.append(_layer_boundary(layer(states[-1], mask, deterministic, pos)))
        return states if every_state else [x, states[-1]]

    def _scanned(self, x, mask, deterministic: bool, groups: int, every_state: bool, pos) -> list:
        """Layers 1 .. groups * every as a checkpointed scan over groups: each layer's output in order
        (every_state), or the last one."""
        every = self.spec.global_attn_every_n_layers
        # Each layer's variables: its params, and its LoRA constants where it has an adapter (flaxclf.nn.lora).
        variables = {c: v for c, v in self.variables.items() if c in ("params", lora.COLLECTION)}

        def layer(i):
            return {c: v[str(i)] for c, v in variables.items() if str(i) in v}
        # Layer j + 1's module computes position j of every group (the same attention kind and rotary theta).
        template = [ModernBertLayer(self.spec, j + 1, self.dtype, self.attention, parent=None) for j in range(every)]
        stacked = [jax.tree.map(lambda *ps: jnp.stack(ps), *(layer(g * every + j + 1) for g in range(groups)))
                   for j in range(every)]
        lora_drops = any(p[-1].key == "dropout" for p, _ in
                         jax.tree_util.tree_leaves_with_path(variables.get(lora.COLLECTION, {})))
        drops = not deterministic and (self.spec.attention_dropout > 0 or self.spec.mlp_dropout > 0 or lora_drops)
        keys = jax.random.split(self.make_rng("dropout"), groups) if drops else jnp.zeros(groups, jnp.uint32)

        @partial(jax.checkpoint, policy=jax.checkpoint_policies.save_only_these_names(_GLOBAL_OUT))
        def group(x, xs):
            layer_vars, key = xs
            outs = []
            for j in range(every):
                rngs = {"dropout": jax.random.fold_in(key, j)} if drops else None
                x = _layer_boundary(template[j].apply(layer_vars[j], x, mask, deterministic, pos,
                                                      rngs=rngs))
                outs.append(x)
            return x, jnp.stack(outs) if every_state else None

        x, outs = jax.lax.scan(group, x, (stacked, keys))
        return [outs[g, j] for g in range(groups) for j in range(every)] if every_state else [x]


class ModernBertModel(nn.Module):
    """ModernBertModel: embeddings -> layers -> final_norm."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32
    attention: AttentionImpl = AttentionImpl()
    remat: bool = False

    def setup(self):
        self.embeddings = _Embeddings(self.spec)
        self.layers = _Layers(self.spec, self.dtype, self.attention, self.remat)
        self.final_norm = norm(self.spec)

    def __call__(self, input_ids, attention_mask, deterministic: bool = True, every_state: bool = False,
                 segments: int | None = None):
        """(final hidden states [B, L, D], the embeddings and each layer's output: HF's hidden_states with
        every_state, else the embeddings and the last layer's). segments=S: packed rows, attention_mask holding
        segment ids."""
        packed = segments is not None
        mask = attention_mask if packed else attention_mask > 0
        states = self.layers(self.embeddings(input_ids, deterministic), mask, deterministic, every_state,
                             positions(attention_mask) if packed else None)
        return self.final_norm(states[-1]), tuple(states)
