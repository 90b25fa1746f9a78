"""`flaxclf inspect`: what the head is made of, and which final hidden states actually reach the logits.

The influence of position i is measured, not assumed: the final hidden state h_i alone is moved by a random
vector of norm `scale * |h_i|` and the head is run again; the table reports the largest change of a logit, and
the norm of d logits / d h_i. Every head run goes through one compiled function (lax.map), so a position the
head never reads gives bit-identical logits: an influence of exactly 0.0, not a small number.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict

from flaxclf import data, families
from flaxclf.families import Family
from flaxclf.model import BertClassifier, ClassifierConfig
from flaxclf.modernbert import ModernBertSpec
from flaxclf.predict import Loaded
from flaxclf.vocab import HF_POOLING

PAD_TOKEN = "[PAD]"


@dataclass
class Influence:
    """Per-position influence of the final hidden states on the logits, for one text."""

    tokens: list[str]  # [L], padding shown as [PAD]
    mask: np.ndarray  # int [L]: 1 for real tokens
    moved: np.ndarray  # [L]: max |logit change| when h_i alone is perturbed
    grad: np.ndarray  # [L]: Frobenius norm of d logits / d h_i
    logits: np.ndarray  # [C]: the unperturbed logits
    scale: float

    def to_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "logits": self.logits.tolist(),
                "positions": [{"position": i, "token": t, "pad": not bool(m), "logit_change": float(d),
                               "grad_norm": float(g)} for i, (t, m, d, g) in
                              enumerate(zip(self.tokens, self.mask, self.moved, self.grad, strict=True))]}


def encode_text(loaded: Loaded, text: str, pair: str | None = None, pad_to: int | None = None,
                ) -> tuple[dict[str, np.ndarray], list[str]]:
    """One text as a [1, L] batch padded as training would (the smallest bucket that holds it, unless
    pad_to is given; pad_to=0 means no padding), and its tokens."""
    tok = data.load_tokenizer(loaded.model_dir, loaded.max_length)
    enc = tok.encode(text, pair) if pair is not None else tok.encode(text)
    n = len(enc.ids)
    if pad_to is None:
        pad_to = next(b for b in data.bucket_lengths(loaded.buckets, loaded.max_length) if b >= n)
    length = max(n, pad_to)
    ids, types, mask = (np.zeros((1, length), np.int32) for _ in range(3))
    ids[0, :n], types[0, :n], mask[0, :n] = enc.ids, enc.type_ids, 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}, enc.tokens + [PAD_TOKEN] * (length - n)


@functools.lru_cache(maxsize=16)
def _measure_fn(model: BertClassifier, scale: float, seed: int):
    """The jitted measurement for one model (cached: a second text of the same length does not recompile)."""

    def measure(params, ids, mask, types):
        hidden = model.apply(params, ids, mask, types, method="encode")  # [1, L, D]
        h_LxD = hidden[0].astype(jnp.float32)
        length = h_LxD.shape[0]

        def head(h_LxD):
            return model.apply(params, h_LxD[None].astype(hidden.dtype), mask, method="classify")[0]

        u_LxD = jax.random.normal(jax.random.PRNGKey(seed), h_LxD.shape)
        u_LxD = u_LxD / jnp.linalg.norm(u_LxD, axis=-1, keepdims=True)
        delta_LxD = scale * jnp.linalg.norm(h_LxD, axis=-1, keepdims=True) * u_LxD

        def perturbed(i):  # i == length: no position perturbed (the reference)
            at_i = (jnp.arange(length) == i)[:, None]
            return head(jnp.where(at_i, h_LxD + delta_LxD, h_LxD))

        z = jax.lax.map(perturbed, jnp.arange(length + 1))  # [L + 1, C]
        jac_CxLxD = jax.jacrev(head)(h_LxD)
        return z[length], jnp.abs(z[:length] - z[length]).max(-1), jnp.sqrt((jac_CxLxD ** 2).sum((0, 2)))

    return jax.jit(measure)


def influence(model: BertClassifier, params: dict, batch: dict[str, np.ndarray], scale: float = 1.0,
              seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits [C], moved [L], grad [L]) for a [1, L] batch; see the module docstring."""
    fn = _measure_fn(model, float(scale), int(seed))
    out = fn(params, *(jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids")))
    return tuple(np.asarray(x) for x in out)


def measure(loaded: Loaded, text: str, pair: str | None = None, pad_to: int | None = None, scale: float = 1.0,
            seed: int = 0) -> Influence:
    """The influence table of one text under a loaded classifier."""
    batch, tokens = encode_text(loaded, text, pair, pad_to)
    logits, moved, grad = influence(loaded.model, loaded.params, batch, scale, seed)
    return Influence(tokens, batch["attention_mask"][0], moved, grad, logits, scale)


# ---------------------------------------------------------------------------------------------- the drawing

_POSITIONS = {
    "cls_pooler": "h[:, 0]: position 0 ([CLS]) only",
    "cls": "h[:, 0]: position 0 ([CLS]) only",
    "mean": "masked mean over every non-pad position",
    "max": "masked max over every non-pad position",
}


def _count(tree: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _hf_module(family: Family, canonical: str) -> str:
    """A canonical module's name in the family's PyTorch class, without the base model's prefix."""
    name = families.to_hf(family, canonical + ".weight").removesuffix(".weight").removeprefix(family.prefix + ".")
    return "pooler" if name == "pooler.dense" else name


def pooling_name(cfg: ClassifierConfig) -> str:
    """The pooling setting as the user knows it: model.pooling, or ModernBERT's classifier_pooling."""
    if isinstance(cfg.backbone, ModernBertSpec):
        return f"{cfg.backbone.classifier_pooling} (ModernBERT's classifier_pooling)"
    return cfg.pooling


def _table(loaded: Loaded, rows: list[tuple[str, str, str]]) -> str:
    cfg, p = loaded.model.config, loaded.params["params"]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"{loaded.source}: pooling={pooling_name(cfg)}, {loaded.problem_type}, labels {loaded.label_names}"]
    for i, (what, shape, n) in enumerate(rows):
        arrow = "   " if i == 0 or what.startswith("  ") else "-> "
        lines.append(f"  {arrow}{what.ljust(w0)}  {shape.ljust(w1)}  {n.rjust(w2)}{' params' if n else ''}")
    lines.append(f"  total {_count(p):,} params")
    return "\n".join(lines)


def _modernbert_rows(cfg: ClassifierConfig, p: dict, length: int) -> list[tuple[str, str, str]]:
    b, d, c = cfg.backbone, cfg.backbone.hidden_size, cfg.num_labels
    every = b.global_attn_every_n_layers
    glob = sum(b.is_global(i) for i in range(b.num_hidden_layers))
    local_theta = b.global_rope_theta if b.local_rope_theta is None else b.local_rope_theta
    return [
        ("input_ids, attention_mask", f"[1, {length}]", ""),
        (f"backbone: modernbert, {b.num_hidden_layers} layers, hidden {d}, {b.num_attention_heads} heads",
         f"hidden [1, {length}, {d}]", f"{_count(p['model']):,}"),
        (f"  embeddings (vocab {b.vocab_size}, no positions: rotary; no token types) + norm", "",
         f"{_count(p['model']['embeddings']):,}"),
        (f"  encoder: {glob} global layers (every {every}, rotary theta {b.global_rope_theta:g}) and "
         f"{b.num_hidden_layers - glob} local (window +-{b.window}, theta {local_theta:g})"
         f", GeGLU {b.intermediate_size}; final norm", "", ""),
        (f"positions: {_POSITIONS[b.classifier_pooling]}", f"[1, {d}]", "0"),
        (f"head: norm({b.classifier_activation}(dense {d} -> {d}))", f"[1, {d}]", f"{_count(p['head']):,}"),
        (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0"),
        (f"classifier: dense {d} -> {c}", f"logits [1, {c}]", f"{_count(p['classifier']):,}"),
    ]


def architecture(loaded: Loaded, length: int) -> str:
    """The head as a chain of steps with output shapes (batch 1, padded length `length`) and parameter counts."""
    cfg, p = loaded.model.config, loaded.params["params"]
    if isinstance(cfg.backbone, ModernBertSpec):
        return _table(loaded, _modernbert_rows(cfg, p, length))
    b, d, c = cfg.backbone, cfg.backbone.hidden_size, cfg.num_labels
    family = b.family
    flat = flatten_dict(p["bert"])
    emb = _count([v for k, v in flat.items() if k[0] in ("embeddings", "embeddings_project")])
    enc = _count([v for k, v in flat.items() if k[0] == "encoder"])
    positions = f"positions {b.max_position_embeddings}" + (" from padding_idx + 1" if family.positions_from_padding
                                                            else "")
    types = f"types {b.type_vocab_size}" if family.token_types else "no token types"
    width = f", width {b.embedding_width} projected to {d}" if b.projects_embeddings else ""
    layers = len(set(b.layer_params()))
    shared = f", {layers} weight set{'s' if layers > 1 else ''} shared" if family.shared_layers else ""
    rows = [
        ("input_ids, attention_mask" + (", token_type_ids" if family.token_types else ""), f"[1, {length}]", ""),
        (f"backbone: {b.model_type}, {b.num_hidden_layers} layers{shared}, hidden {d}, {b.num_attention_heads} heads",
         f"hidden [1, {length}, {d}]", f"{emb + enc:,}"),
        (f"  embeddings (vocab {b.vocab_size}, {positions}, {types}{width})", "", f"{emb:,}"),
        (f"  encoder: {b.num_hidden_layers} x (self-attention + feed-forward {b.intermediate_size})", "", f"{enc:,}"),
        (f"positions: {_POSITIONS[cfg.pooling]}", f"[1, {d}]", "0"),
    ]
    dropout = (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0")
    if cfg.pooling == HF_POOLING:
        if family.head_dropout_first:
            rows.append(dropout)
        rows.append((f"{_hf_module(family, 'pooler.dense')}: {family.head_activation}(dense {d} -> {d})", f"[1, {d}]",
                     f"{_count(p['pooler']):,}"))
    else:
        rows.append((f"{_hf_module(family, 'pooler.dense')}: none (pooling={cfg.pooling!r})", "", "0"))
    rows += [dropout, (f"{_hf_module(family, 'classifier')}: dense {d} -> {c}", f"logits [1, {c}]",
                       f"{_count(p['classifier']):,}")]
    return _table(loaded, rows)


# ---------------------------------------------------------------------------------------------- the table


def _fmt(x: float) -> str:
    return "0.0" if x == 0 else f"{x:.3e}"


def _silent_pad(inf: Influence, i: int) -> bool:
    return not inf.mask[i] and inf.moved[i] == 0 and inf.grad[i] == 0


def influence_table(inf: Influence) -> str:
    """One row per position; a run of padding positions with exactly zero influence shares one row."""
    header = ("pos", "token", "logit change", "|d logits/d h|")
    rows, i, n = [], 0, len(inf.tokens)
    while i < n:
        j = i
        if _silent_pad(inf, i):
            while j + 1 < n and _silent_pad(inf, j + 1):
                j += 1
        pos = str(i) if j == i else f"{i}-{j}"
        token = inf.tokens[i] if j == i else f"{PAD_TOKEN} x{j - i + 1}"
        rows.append((pos, token, _fmt(float(inf.moved[i])), _fmt(float(inf.grad[i]))))
        i = j + 1
    widths = [max(len(r[k]) for r in [header, *rows]) for k in range(4)]
    out = []
    for r in [header, *rows]:
        out.append("  ".join([r[0].rjust(widths[0]), r[1].ljust(widths[1]), r[2].rjust(widths[2]),
                              r[3].rjust(widths[3])]))
    return "\n".join(out)


def verdict(pooling: str, inf: Influence) -> str:
    """The answer to "does it classify on the [CLS] vector?", from the measurements."""
    real = inf.mask.astype(bool)
    moves = inf.moved > 0
    others = np.arange(len(moves)) != 0
    pads = "exactly 0.0" if not moves[~real].any() else f"nonzero at {int(moves[~real].sum())}"
    if moves[0] and not moves[others].any():
        return (f"Yes: it classifies on the [CLS] vector (pooling={pooling}). Perturbing the final hidden state of "
                f"position 0 moves the logits by {_fmt(float(inf.moved[0]))}; every other position "
                f"({int(real[others].sum())} tokens, {int((~real).sum())} padding) moves them by exactly 0.0. "
                "The other tokens reach the logits only through self-attention inside the encoder, which mixes "
                "them into position 0.")
    total = float(inf.moved.sum()) or 1.0
    return (f"No: pooling={pooling} reads more than position 0. {int(moves[real].sum())} of {int(real.sum())} "
            f"real positions move the logits; position 0 accounts for {100 * float(inf.moved[0]) / total:.1f}% of "
            f"the total change; padding positions: {pads}.")
