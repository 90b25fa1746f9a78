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

from flaxclf import data
from flaxclf.inference.predict import Loaded
from flaxclf.models.classifier import ClassifierConfig
from flaxclf.models.interface import Classifier, Rows, count_params

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
def _measure_fn(model: Classifier, scale: float, seed: int):
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


def influence(model: Classifier, params: dict, batch: dict[str, np.ndarray], scale: float = 1.0,
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

def pooling_name(cfg: ClassifierConfig) -> str:
    """The pooling setting as the user knows it: model.pooling, or ModernBERT's classifier_pooling."""
    return cfg.backbone.pooling_label(cfg.pooling)


def _table(loaded: Loaded, rows: Rows) -> str:
    cfg, p = loaded.model.config, loaded.params["params"]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    w2 = max(len(r[2]) for r in rows)
    lines = [f"{loaded.source}: pooling={pooling_name(cfg)}, {loaded.problem_type}, labels {loaded.label_names}"]
    for i, (what, shape, n) in enumerate(rows):
        arrow = "   " if i == 0 or what.startswith("  ") else "-> "
        lines.append(f"  {arrow}{what.ljust(w0)}  {shape.ljust(w1)}  {n.rjust(w2)}{' params' if n else ''}")
    lines.append(f"  total {count_params(p):,} params")
    return "\n".join(lines)


def architecture(loaded: Loaded, length: int) -> str:
    """The head as a chain of steps with output shapes (batch 1, padded length `length`) and parameter counts."""
    cfg = loaded.model.config
    return _table(loaded, cfg.encoder.describe(cfg, loaded.params["params"], length))


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
