"""Packing (data.packing=on): the texts of a batch share rows of tokens, told apart by segment ids.

A packed batch has R rows of L tokens: data.packing_length where set, else the split's longest text rounded up to
a multiple of 16 (row_length). Not max_length: a token's attention spans its whole row (masked to its text), so
that work grows with L, and rows no longer than the texts need make the step faster (bench/README.md, section
2c). Its "attention_mask" holds each token's segment: 1, 2, ..., for
the texts in the order they sit in the row, 0 on padding (flaxclf.nn.segments reads it; an unpacked batch's 0/1
mask is the one-segment case), and its per-text fields ("labels", "weight", evaluation's "row") are [R, S]: one
slot per text a row can hold, weight 0 where a row holds fewer. Token types are each text's own; positions restart
at each text inside the model, from the segment ids.

Which texts a training batch holds does not change: the global batches are those of unpacked batching with one
length bucket (random batches of the whole length range: mixing lengths is what makes rows fill), row for row the
same texts. Only how they sit changes. Each batch's texts go into rows best-fit decreasing. The row count R of a
step comes from a small set fixed for the whole run (`shapes` values, chosen from every step's need to pad the
fewest rows), so XLA compiles at most that many train steps; shapes=1 gives one static shape, as a TPU wants.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from flaxclf.data.types import DataError, TokenizedSplit

ROW_MULTIPLE = 16  # a fitted row's length is a multiple of this: a whole number of 16-float vectors


def row_length(longest: int, max_length: int, setting: int | None, split: str) -> int:
    """The tokens a packed row of `split` holds: `setting` (data.packing_length) where given, else the longest text
    (`longest` tokens, over every process) rounded up to a multiple of ROW_MULTIPLE, at most max_length."""
    if setting is None:
        return min(max_length, max(ROW_MULTIPLE, -(-longest // ROW_MULTIPLE) * ROW_MULTIPLE))
    if longest > setting:
        raise DataError(f"the {split} split has a text of {longest} tokens, longer than a packed row of "
                        f"data.packing_length {setting}; raise data.packing_length to {longest} or more, or set it "
                        f"to null to fit the rows to the texts")
    return setting


def pack(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit decreasing: the indices (into `lengths`) of each row's texts, in the order they sit. Each text goes,
    longest first, into the open row whose free room fits it most tightly (ties: the row opened last), else a new
    row. Deterministic: ties between equal lengths keep index order."""
    lengths = np.asarray(lengths, np.int64)
    if len(lengths) and lengths.max() > capacity:
        raise ValueError(f"a text of {int(lengths.max())} tokens does not fit a row of {capacity}")
    rows: list[list[int]] = []
    by_room: list[list[int]] = [[] for _ in range(capacity + 1)]  # rows with exactly this much room left
    has_room = np.zeros(capacity + 1, bool)
    for i in np.argsort(-lengths, kind="stable"):
        n = int(lengths[i])
        fits = np.flatnonzero(has_room[n:])
        if len(fits):
            room = n + int(fits[0])
            r = by_room[room].pop()
            has_room[room] = bool(by_room[room])
        else:
            r, room = len(rows), capacity
            rows.append([])
        rows[r].append(int(i))
        left = room - n
        by_room[left].append(r)
        has_room[left] = True
    return rows


def slots(rows: list[list[int]], num_rows: int, segments: int, index: np.ndarray | None = None) -> np.ndarray:
    """[num_rows, segments] int64: each text slot's row of the split (`index[i]` for the packed text i), -1 where
    empty."""
    out = np.full((num_rows, segments), -1, np.int64)
    for r, members in enumerate(rows):
        m = np.asarray(members, np.int64)
        out[r, :len(m)] = m if index is None else index[m]
    return out


def host_batch(split: TokenizedSplit, slots_RxS: np.ndarray, length: int, evaluation: bool = False
               ) -> dict[str, np.ndarray]:
    """The packed batch of `slots` (split rows per text slot, -1 empty): tokens in rows of `length`, each text
    after the one before it."""
    r, s = slots_RxS.shape
    filled = slots_RxS >= 0
    idx = np.where(filled, slots_RxS, 0)
    n_RxS = np.where(filled, split.lengths[idx] if len(split) else 0, 0)
    start_RxS = np.cumsum(n_RxS, axis=1) - n_RxS  # where each text begins in its row
    ids = np.zeros((r, length), np.int32)
    seg = np.zeros((r, length), np.int32)
    types = np.zeros((r, length), np.int32)
    rr, ss = np.nonzero(filled)
    if len(rr):
        n = n_RxS[rr, ss]
        tok_row = np.repeat(rr, n)
        within = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        tok_col = np.repeat(start_RxS[rr, ss], n) + within
        src = np.repeat(split.offsets[slots_RxS[rr, ss]], n) + within
        ids[tok_row, tok_col] = split.input_ids[src]
        types[tok_row, tok_col] = split.token_type_ids[src]
        seg[tok_row, tok_col] = np.repeat(ss + 1, n)
    labels = np.zeros((r, s) + split.labels.shape[1:], split.labels.dtype)
    labels[filled] = split.labels[slots_RxS[filled]]
    batch = {"input_ids": ids, "attention_mask": seg, "token_type_ids": types, "labels": labels,
             "weight": filled.astype(np.float32)}
    if evaluation:
        batch["row"] = np.where(filled, split.rows[idx], -1).astype(np.int32)
    return batch


def choose_shapes(needs: np.ndarray, count: int) -> list[int]:
    """At most `count` row counts, the largest need among them, that pad the fewest rows when each step takes the
    smallest one that holds its need (a dynamic program over the distinct needs)."""
    values, freq = np.unique(np.asarray(needs, np.int64), return_counts=True)
    d, k = len(values), min(count, len(values))
    seen = np.concatenate([[0], np.cumsum(freq)])
    inf = np.iinfo(np.int64).max // 4
    cost = np.full((k + 1, d), inf, np.int64)  # cost[m, j]: needs 0..j covered by m shapes, the last at values[j]
    back = np.zeros((k + 1, d), np.int64)
    cost[1] = values * seen[1:]
    for m in range(2, k + 1):
        for j in range(m - 1, d):
            options = cost[m - 1, :j] + values[j] * (seen[j + 1] - seen[1:j + 1])
            back[m, j] = int(np.argmin(options))
            cost[m, j] = options[back[m, j]]
    out, j = [], d - 1
    for m in range(k, 0, -1):
        out.append(int(values[j]))
        j = int(back[m, j])
    return sorted(out)


def segments(batch: dict) -> int | None:
    """A packed batch's text slots per row (its per-text fields are [rows, slots]), None for a padded one."""
    return batch["weight"].shape[1] if batch["weight"].ndim == 2 else None


def per_text(x, batch: dict):
    """A per-text field or output of `batch` ([rows] or, packed, [rows, slots]) as one entry per text slot,
    [N, ...]; numpy or jax arrays alike."""
    return x.reshape((-1,) + x.shape[batch["weight"].ndim:])


def round_up(n: np.ndarray | int, multiple: int) -> np.ndarray:
    return -(-np.asarray(n, np.int64) // multiple) * multiple
