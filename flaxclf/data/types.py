"""What the data modules hand each other and their callers: the error, the task, a tokenized split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "validation", "test")


class DataError(ValueError):
    """A problem with the user's data or data settings; the message names the file, row or key."""


@dataclass
class Task:
    """What the data says about the problem."""

    problem_type: str  # SINGLE, MULTI or REGRESSION (flaxclf.options)
    label_names: list[str]  # id -> name; [] for regression
    num_labels: int
    train_labels: np.ndarray | None = None  # every kept training text's label (the same on every process)

    def id2label(self) -> dict[int, str]:
        return dict(enumerate(self.label_names))

    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.label_names)}


@dataclass
class TokenizedSplit:
    """One split's share of rows on this process, tokenized without padding (rows concatenated)."""

    name: str
    input_ids: np.ndarray  # int32 [T]: the tokens of all rows, one after another
    token_type_ids: np.ndarray  # int8 [T]
    offsets: np.ndarray  # int64 [N + 1]: row r is input_ids[offsets[r]:offsets[r + 1]]
    labels: np.ndarray  # int32 [N], float32 [N] or float32 [N, C]
    rows: np.ndarray  # int64 [N]: each row's index among all kept rows of the split (before the host split)
    num_rows_total: int  # kept rows (texts) over all processes
    max_length: int
    process_index: int
    process_count: int
    from_cache: bool = False  # True when the tokens came from the .npz cache
    batch_slots: int | None = None  # rows sharded as the slots of this global batch size; None: rows i % P
    # data.long_text=chunks: a row is one window of a text, and `rows` repeats the text's index for each window.
    chunked: bool = False
    packing_length: int | None = None  # data.packing_length: a packed row's tokens; None: fitted to the texts

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def text_labels(self) -> np.ndarray:
        """One label per text, in ascending text index (the order per-text outputs come in)."""
        _, first = np.unique(self.rows, return_index=True)
        return self.labels[first]
