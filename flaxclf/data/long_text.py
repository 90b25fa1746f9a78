"""Texts longer than max_length (data.long_text): keep their head and tail, or cut them into overlapping windows,
and bring the windows' outputs back to one per text.

Both work on the untruncated encodings, which the tokenizer's post-processor has already wrapped in its special
tokens ([CLS] ... [SEP], <s> ... </s>): a row is `prefix specials + content + suffix specials`, and every piece
this module makes keeps that wrapping around a slice of the content. The windows are those of `tokenizers`'
truncation with a stride (each window holds `budget` content tokens and starts `budget - stride` after the one
before; the last one ends at the text's end), so a text of at most `budget` content tokens is one window equal
to its truncated encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flaxclf.data.types import DataError
from flaxclf.options import MULTI, REGRESSION, SINGLE


@dataclass(frozen=True)
class LongText:
    """The data.long_text settings, resolved for one tokenizer."""

    mode: str  # truncate | head_tail | chunks
    max_length: int
    stride: int = 0
    head_tokens: int | None = None

    def key(self) -> str:
        """What the cached tokens depend on."""
        if self.mode == "truncate":
            return f"truncate|{self.max_length}"
        return f"{self.mode}|{self.max_length}|{self.stride}|{self.head_tokens}"


def special_counts(tok) -> tuple[int, int]:
    """(prefix, suffix): how many special tokens the tokenizer's post-processor puts before and after a single
    text. The tokenizer must not truncate."""
    probe = "hello world, a probe"
    full, bare = tok.encode(probe).ids, tok.encode(probe, add_special_tokens=False).ids
    n = len(bare)
    for p in range(len(full) - n + 1):
        if full[p:p + n] == bare:
            return p, len(full) - n - p
    raise DataError("the model's tokenizer does not wrap a text in fixed special tokens, so data.long_text="
                    "head_tail or chunks can't cut it; use data.long_text=truncate")


def budget(max_length: int, prefix: int, suffix: int) -> int:
    """Content tokens a row of max_length holds."""
    return max_length - prefix - suffix


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenated aranges [starts[i], starts[i] + lengths[i]) without a Python loop."""
    lengths = lengths.astype(np.int64)
    total = int(lengths.sum())
    ends = np.cumsum(lengths)
    shift = np.repeat(starts.astype(np.int64) - (ends - lengths), lengths)
    return shift + np.arange(total, dtype=np.int64)


def _assemble(arrays: dict[str, np.ndarray], seg_starts_RxS: np.ndarray, seg_lens_RxS: np.ndarray
              ) -> dict[str, np.ndarray]:
    """New rows, each the concatenation of its segments (absolute token positions in `arrays`)."""
    index = _ranges(seg_starts_RxS.ravel(), seg_lens_RxS.ravel())
    offsets = np.zeros(seg_lens_RxS.shape[0] + 1, np.int64)
    np.cumsum(seg_lens_RxS.sum(1), out=offsets[1:])
    return {"input_ids": arrays["input_ids"][index], "token_type_ids": arrays["token_type_ids"][index],
            "offsets": offsets}


def head_tail(arrays: dict[str, np.ndarray], prefix: int, suffix: int, max_length: int,
              head_tokens: int | None) -> dict[str, np.ndarray]:
    """Each row cut to max_length by keeping its first `head_tokens` content tokens (default: a quarter of the
    room) and as many of its last ones as fit; rows that fit are unchanged."""
    room = budget(max_length, prefix, suffix)
    head = room // 4 if head_tokens is None else head_tokens
    if head > room:
        raise DataError(f"data.head_tokens {head} is more than the {room} text tokens a row of data.max_length "
                        f"{max_length} holds; use data.head_tokens <= {room}")
    start = arrays["offsets"][:-1]
    n = np.diff(arrays["offsets"]) - prefix - suffix
    long = n > room
    h = np.where(long, head, n)
    t = np.where(long, room - head, 0)
    starts = np.stack([start, start + prefix, start + prefix + n - t, start + prefix + n], 1)
    lens = np.stack([np.full_like(n, prefix), h, t, np.full_like(n, suffix)], 1)
    return _assemble(arrays, starts, lens)


def chunks(arrays: dict[str, np.ndarray], prefix: int, suffix: int, max_length: int,
           stride: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every row as overlapping windows of max_length; returns the windows and each window's row index."""
    room = budget(max_length, prefix, suffix)
    if stride >= room:
        raise DataError(f"data.stride {stride} leaves no new tokens per window: a row of data.max_length "
                        f"{max_length} holds {room} text tokens; use data.stride < {room}")
    start = arrays["offsets"][:-1]
    n = np.diff(arrays["offsets"]) - prefix - suffix
    step = room - stride
    count = np.where(n <= room, 1, -(-(n - room) // step) + 1)
    row = np.repeat(np.arange(len(n)), count)
    j = np.arange(len(row)) - np.repeat(np.cumsum(count) - count, count)  # window number within its row
    w_start = j * step
    w_len = np.minimum(w_start + room, n[row]) - w_start
    s = start[row]
    starts = np.stack([s, s + prefix + w_start, s + prefix + n[row]], 1)
    lens = np.stack([np.full_like(row, prefix), w_len, np.full_like(row, suffix)], 1)
    return _assemble(arrays, starts, lens), row


def check_aggregation(problem_type: str, how: str) -> None:
    """max_prob needs class probabilities: a regression model can only average its windows."""
    if how == "max_prob" and problem_type == REGRESSION:
        raise DataError("data.chunk_aggregation=max_prob needs class probabilities; a regression model "
                        "averages its windows: use data.chunk_aggregation=mean_logits")


def aggregate(problem_type: str, how: str, logits_RxC: np.ndarray, doc_R: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows' outputs -> one per text: (text ids in ascending order, their outputs, each text's first window).

    mean_logits averages the logits; max_prob takes each class's highest probability over the windows
    (softmax or sigmoid) and returns its log (single-label) or logit (multi-label), so argmax, thresholds and
    the probabilities predict prints follow it.
    """
    check_aggregation(problem_type, how)
    docs, first, inverse = np.unique(doc_R, return_index=True, return_inverse=True)
    z = np.asarray(logits_RxC, np.float64)
    if how == "mean_logits":
        out = np.zeros((len(docs), z.shape[1]))
        np.add.at(out, inverse, z)
        out /= np.bincount(inverse, minlength=len(docs))[:, None]
    elif how == "max_prob":
        if problem_type == SINGLE:
            p = np.exp(z - z.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        elif problem_type == MULTI:
            p = 0.5 * (1.0 + np.tanh(0.5 * z))
        else:
            raise ValueError(f"unknown problem type {problem_type!r}")
        best = np.zeros((len(docs), z.shape[1]))
        np.maximum.at(best, inverse, p)
        tiny = np.finfo(np.float64).tiny
        out = np.log(np.maximum(best, tiny))
        if problem_type == MULTI:
            out = out - np.log(np.maximum(1.0 - best, tiny))
    else:
        raise ValueError(f"unknown chunk aggregation {how!r}")
    return docs, out.astype(np.float32), first
