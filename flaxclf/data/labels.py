"""Tables -> checked rows and label arrays: which rows are kept, what kind of labels they have, their ids.

Strings (or ints) are classes, mapped to ids in sorted order; floats are a regression target; lists are
multi-label, either label names or 0/1 flags of a fixed length. ``label_type: auto`` infers which from the
training file; the Task returned says what was found and is exported as id2label / label2id. Rows with an empty
text are refused or skipped (``data.empty_text``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from flaxclf.data.readers import MISSING, Table
from flaxclf.data.types import DataError, Task
from flaxclf.options import MULTI, REGRESSION, SINGLE


@dataclass
class Columns:
    """The columns a task reads, and how it treats their values (the data.* settings)."""

    text: str
    pair: str | None
    label: str
    label_type: str
    empty_text: str

    def names(self) -> list[str]:
        return [n for n in (self.text, self.pair, self.label) if n is not None]


@dataclass
class Rows:
    """One split after checks: the kept rows' texts and raw labels."""

    table: Table
    keep: list[int]  # table row of each kept row
    texts: list[str]
    pairs: list[str] | None
    raw_labels: list[Any]
    label_column: str


def _pair_at(t: Table, name: str, i: int) -> str:
    text = t.text(name, i)
    if text is None:
        raise DataError(f"{t.where(i)} has no {name!r}; every row of a pair task needs both texts")
    return text


def select_rows(t: Table, cols: Columns, say: Callable[[str], None]) -> Rows:
    """Checks the columns and texts of one table; drops (or rejects) rows with an empty text."""
    t.require([("data.text_column", cols.text), ("data.text_pair_column", cols.pair),
               ("data.label_column", cols.label)])
    keep, texts, pairs, skipped = [], [], [] if cols.pair else None, []
    for i in range(t.num_rows):
        a = t.text(cols.text, i) or ""
        b = _pair_at(t, cols.pair, i) if cols.pair else None
        if not a.strip() or (b is not None and not b.strip()):
            if cols.empty_text == "error":
                raise DataError(f"{t.where(i)} has an empty text; fill it, drop the row, or set "
                                f"data.empty_text: skip")
            skipped.append(t.locator(i))
            continue
        keep.append(i)
        texts.append(a)
        if pairs is not None:
            pairs.append(b)
    if skipped:
        say(f"{t.source}: skipped {len(skipped)} rows with an empty text ({', '.join(skipped[:10])}"
            f"{', ...' if len(skipped) > 10 else ''})")
    if not keep:
        raise DataError(f"{t.source} has no row with a non-empty text; check data.text_column")
    labels = [t.columns[cols.label][i] for i in keep]
    return Rows(t, keep, texts, pairs, labels, cols.label)


def _parse_number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return None
    return None


def _as_list(v: Any) -> list | None:
    if isinstance(v, (list, tuple)):
        return list(v)
    if isinstance(v, str) and v.lstrip().startswith("["):
        try:
            parsed = json.loads(v)
        except json.JSONDecodeError:
            return None
        return parsed if isinstance(parsed, list) else None
    return None


def _infer_label_type(r: Rows) -> str:
    """auto: lists -> multi, whole numbers -> int, other numbers -> float, anything else -> string."""
    values = r.raw_labels
    for j, v in enumerate(values):
        if v is None or v is MISSING or (isinstance(v, str) and not v.strip()):
            raise _missing_label(r, j)
    lists = [_as_list(v) is not None for v in values]
    if all(lists):
        return "multi"
    if any(lists):
        j = lists.index(False)
        raise DataError(f"{r.table.where(r.keep[j])}: label {values[j]!r} is not a list while other rows have "
                        f"lists; write every multi-label value as a list, e.g. [\"a\"] or []")
    nums = [_parse_number(v) for v in values]
    if all(n is not None for n in nums):
        if all(isinstance(v, int) or (isinstance(v, str) and v.strip().lstrip("+-").isdigit()) for v in values):
            return "int"
        return "float"
    typed_numbers = [i for i, v in enumerate(values) if isinstance(v, (int, float)) and not isinstance(v, bool)]
    text_numbers = [i for i, n in enumerate(nums) if n is not None and isinstance(values[i], str)]
    if typed_numbers or (text_numbers and len(text_numbers) * 2 > len(values)):
        i = next(i for i, n in enumerate(nums) if n is None)
        raise DataError(f"{r.table.where(r.keep[i])}: label {values[i]!r} is not a number while most labels are; "
                        f"fix the row, or set data.label_type: string if the labels are class names")
    return "string"


def _missing_label(r: Rows, j: int) -> DataError:
    return DataError(f"{r.table.where(r.keep[j])} has no label in {r.label_column!r}; fill it or drop the row")


def _class_key(r: Rows, j: int, kind: str) -> str:
    v = r.raw_labels[j]
    if v is None or v is MISSING or (isinstance(v, str) and not v.strip()):
        raise _missing_label(r, j)
    if kind == "int":
        n = _parse_number(v)
        if n is None or not float(n).is_integer():
            raise DataError(f"{r.table.where(r.keep[j])}: label {v!r} is not a whole number (data.label_type: "
                            f"int); fix the row or change data.label_type")
        return str(int(n))
    return v.strip() if isinstance(v, str) else str(v)


def _float_label(r: Rows, j: int) -> float:
    v = r.raw_labels[j]
    if v is None or v is MISSING:
        raise _missing_label(r, j)
    n = _parse_number(v)
    if n is None or not math.isfinite(n):
        raise DataError(f"{r.table.where(r.keep[j])}: regression label {v!r} is not a finite number; fix or "
                        f"drop the row")
    return n


def _multi_items(r: Rows, j: int) -> list:
    items = _as_list(r.raw_labels[j])
    if items is None:
        raise DataError(f"{r.table.where(r.keep[j])}: multi-label value {r.raw_labels[j]!r} is not a list; write "
                        f"a list of label names or of 0/1 flags, e.g. [\"a\", \"b\"] or [0, 1, 1]")
    return items


def _is_flags(rows: Rows) -> bool:
    lists = [_multi_items(rows, j) for j in range(len(rows.keep))]
    sizes = {len(x) for x in lists}
    return len(sizes) == 1 and 0 not in sizes and all(
        isinstance(v, (int, bool)) and v in (0, 1) for x in lists for v in x)


def _unseen(r: Rows, j: int, name: str) -> DataError:
    return DataError(f"{r.table.where(r.keep[j])}: label {name!r} never appears in the training data; fix the "
                     f"row, drop it, or add training examples of it")


def _encode_multi(r: Rows, names: list[str], flags: bool) -> np.ndarray:
    out = np.zeros((len(r.keep), len(names)), np.float32)
    index = {n: i for i, n in enumerate(names)}
    for j in range(len(r.keep)):
        items = _multi_items(r, j)
        if flags:
            if len(items) != len(names) or any(v not in (0, 1) for v in items):
                raise DataError(f"{r.table.where(r.keep[j])}: flags {items!r} are not {len(names)} values of "
                                f"0 or 1 like the training rows; fix the row")
            out[j] = items
            continue
        for name in map(str, items):
            if name not in index:
                raise _unseen(r, j, name)
            out[j, index[name]] = 1.0
    return out


def encode_labels(rows: dict[str, Rows], label_type: str, fixed_names: list[str] | None,
                  ) -> tuple[Task, dict[str, np.ndarray]]:
    """Chooses the problem type from the training rows and turns every split's labels into arrays."""
    train = rows["train"]
    kind = _infer_label_type(train) if label_type == "auto" else label_type
    n = {s: range(len(r.keep)) for s, r in rows.items()}
    if kind == "float":
        out = {s: np.array([_float_label(r, j) for j in n[s]], np.float32) for s, r in rows.items()}
        return Task(REGRESSION, [], 1), out
    if kind == "multi":
        flags = _is_flags(train)
        names = fixed_names or ([str(i) for i in range(len(_multi_items(train, 0)))] if flags else
                                sorted({str(v) for j in n["train"] for v in _multi_items(train, j)}))
        return Task(MULTI, names, len(names)), {s: _encode_multi(r, names, flags) for s, r in rows.items()}
    keys = {s: [_class_key(r, j, kind) for j in n[s]] for s, r in rows.items()}
    names = fixed_names or sorted(set(keys["train"]), key=(lambda k: int(k)) if kind == "int" else None)
    index = {k: i for i, k in enumerate(names)}
    out = {}
    for s, r in rows.items():
        bad = next((j for j, k in enumerate(keys[s]) if k not in index), None)
        if bad is not None:
            raise _unseen(r, bad, keys[s][bad])
        out[s] = np.array([index[k] for k in keys[s]], np.int32)
    return Task(SINGLE, names, len(names)), out
