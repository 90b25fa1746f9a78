"""Files -> examples -> tokenized, bucketed, host-sharded global batches.

Reading. A packaged task (``data.task``, see flaxclf.assets) or user files (``data.train_file`` and optional
validation/test files; the files win when both are set) in CSV (with a header row, RFC 4180 quoting), TSV
(header row, one row a line, no quoting, like the GLUE files), JSONL (one object a line), Parquet, or a
Hugging Face ``datasets`` folder written by ``save_to_disk`` (a Dataset, or a DatasetDict whose split of the
same name is used). Text files must be UTF-8. Texts come from ``text_column`` (and ``text_pair_column`` for
pairs), labels from ``label_column``.

Labels. Strings (or ints) are classes, mapped to ids in sorted order; floats are a regression target; lists
are multi-label, either label names or 0/1 flags of a fixed length. ``label_type: auto`` infers which from
the training file; the Task returned says what was found and is exported as id2label / label2id.

Multi-host. Every process reads and filters the whole file (so all agree on the labels), then tokenizes and
counts only its share of rows (``i`` is a row's index among all kept rows of its split). Training rows sit in
B = global batch size fixed *slots*: row i belongs to slot ``i % B`` and process p owns the slot block
``[p * B/P, (p + 1) * B/P)`` (P processes; P must divide B), which is exactly its block of every global batch.
Evaluation splits are shared as rows ``i % P == p``: their order doesn't matter, only that each row is seen once.

Tokenization uses the model's fast tokenizer (the same Rust tokenizer as transformers' BertTokenizerFast)
with truncation (``longest_first`` for pairs) and is cached as .npz keyed by a hash of the tokenized texts,
of the tokenizer files and of max_length.

Batches. Every batch is padded to one of a few lengths (the configured buckets clipped to max_length, plus
max_length), so XLA compiles at most ``len(bucket_lengths)`` shapes per step function. Training batches depend
only on (data, B, buckets, seed, epoch), never on the process count, so a pod run sees the same global batches,
row for row and position for position, as a single-host run. Each epoch, each slot's rows of each bucket are
shuffled by (seed, epoch, slot); bucket k has n_k batches, the fewest rows any slot has for it, and global batch
j of bucket k is row j of every slot, in slot order. A slot's rows beyond n_k are promoted to bucket k + 1
(padded longer) rather than dropped, so an epoch has ``N // B`` steps and leaves out only ``N % B`` rows (the
last bucket's leftovers: a different few each epoch). The order of the epoch's batches over buckets is
shuffled by (seed, epoch). Evaluation sees every row exactly once: the last batch of a bucket is filled with
rows of ``weight`` 0.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import queue
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxclf import assets
from flaxclf.config import DataConfig

SPLITS = ("train", "validation", "test")
SINGLE, MULTI, REGRESSION = "single_label_classification", "multi_label_classification", "regression"
FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weight")
_FORMATS = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet",
            ".pq": "parquet"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
_CACHE_VERSION = "1"
_RT_LABELS = ["very negative", "negative", "positive", "very positive"]


class DataError(ValueError):
    """A problem with the user's data or data settings; the message names the file, row or key."""


@dataclass
class Task:
    """What the data says about the problem."""

    problem_type: str  # SINGLE, MULTI or REGRESSION
    label_names: list[str]  # id -> name; [] for regression
    num_labels: int

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
    num_rows_total: int  # kept rows over all processes
    max_length: int
    process_index: int
    process_count: int
    from_cache: bool = False  # True when the tokens came from the .npz cache
    batch_slots: int | None = None  # rows sharded as the slots of this global batch size; None: rows i % P

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


# ---------------------------------------------------------------------------------------------- reading


@dataclass
class _Table:
    """Columns read from one file, before any check of their values."""

    source: str  # how messages name the file
    columns: dict[str, list[Any]]  # only the columns that were asked for and exist
    present: list[str]  # every column the file has
    num_rows: int
    lines: list[int] | None = None  # the file line of each row (text formats); None: name rows by number

    def locator(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i + 1}"

    def where(self, i: int) -> str:
        return f"{self.source} {self.locator(i)}"


_MISSING = object()  # a JSONL key absent from one row


def _decode(raw: bytes, path: Path) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} line {line}: byte 0x{raw[e.start]:02x} is not valid UTF-8; save the file "
                        f"as UTF-8") from None
    return text.removeprefix("\ufeff")


def _read_text(path: Path) -> str:
    text = _decode(path.read_bytes(), path)
    if not text.strip():
        raise DataError(f"{path} is empty; give a file with a header and at least one row")
    return text


def _read_delimited(path: Path, wanted: list[str], tsv: bool) -> _Table:
    quoting = {"delimiter": "\t", "quoting": csv.QUOTE_NONE} if tsv else {}
    reader = csv.reader(io.StringIO(_read_text(path), newline=""), **quoting)
    header = next(reader)
    cells: list[list[str]] = []
    lines: list[int] = []
    start = reader.line_num + 1
    for row in reader:
        if row:
            if len(row) != len(header):
                raise DataError(f"{path} line {start}: {len(row)} fields but the header has {len(header)}; "
                                f"fix the row (quote fields that contain the delimiter, or escape it)")
            cells.append(row)
            lines.append(start)
        start = reader.line_num + 1
    if not cells:
        raise DataError(f"{path} has a header but no rows; add data rows")
    cols = {n: [r[header.index(n)] for r in cells] for n in wanted if n in header}
    return _Table(str(path), cols, header, len(cells), lines)


def _read_jsonl(path: Path, wanted: list[str]) -> _Table:
    records, lines, present = [], [], {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {lineno} is not valid JSON ({e.msg}); write one object a line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path} line {lineno} is a {type(rec).__name__}, not an object; write one "
                            f"{{\"column\": value}} object a line")
        present.update(dict.fromkeys(rec))
        records.append(rec)
        lines.append(lineno)
    cols = {n: [r.get(n, _MISSING) for r in records] for n in wanted if n in present}
    return _Table(str(path), cols, list(present), len(records), lines)


def _read_parquet(path: Path, wanted: list[str]) -> _Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # arrow's ArrowInvalid / ArrowIOError
        raise DataError(f"{path} is not a readable Parquet file ({type(e).__name__}); check data.format") from None
    if table.num_rows == 0:
        raise DataError(f"{path} has no rows; give a file with at least one row")
    cols = {n: table.column(n).to_pylist() for n in wanted if n in table.column_names}
    return _Table(str(path), cols, table.column_names, table.num_rows)


def _read_hf_disk(path: Path, wanted: list[str], split: str) -> _Table:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path} is a Hugging Face datasets folder but `datasets` is not installed; "
                        f"pip install 'flaxclf[datasets]'") from None
    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"{path} is not a folder written by save_to_disk ({e}); check the path") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} holds splits {', '.join(ds)} but no {split!r}; point data.{split}_file "
                            f"at a folder with that split")
        ds = ds[split]
    if len(ds) == 0:
        raise DataError(f"{path} has no rows; give a dataset with at least one row")
    cols = ds.select_columns([n for n in wanted if n in ds.column_names]).to_dict()
    for n, values in cols.items():
        if isinstance(ds.features[n], datasets.ClassLabel):  # class ids -> their names
            cols[n] = [ds.features[n].int2str(v) for v in values]
    return _Table(str(path), cols, list(ds.column_names), len(ds))


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    if path.is_dir():
        return "hf_disk"
    if path.suffix.lower() in _FORMATS:
        return _FORMATS[path.suffix.lower()]
    raise DataError(f"cannot tell the format of {path} from its extension {path.suffix!r}; set data.format to "
                    f"one of csv, tsv, jsonl, parquet, hf_disk")


def _read_table(path: Path, fmt: str | None, split: str, wanted: list[str]) -> _Table:
    if not path.exists():
        raise DataError(f"data.{split}_file: {path} does not exist; check the path")
    fmt = _format_of(path, fmt)
    if fmt == "hf_disk":
        return _read_hf_disk(path, wanted, split)
    if path.is_dir():
        raise DataError(f"data.{split}_file: {path} is a folder, not a {fmt} file; name the file")
    readers: dict[str, Callable[[], _Table]] = {
        "csv": lambda: _read_delimited(path, wanted, tsv=False),
        "tsv": lambda: _read_delimited(path, wanted, tsv=True),
        "jsonl": lambda: _read_jsonl(path, wanted),
        "parquet": lambda: _read_parquet(path, wanted),
    }
    return readers[fmt]()


def _read_rt_snippets(path: Path, say: Callable[[str], None]) -> dict[str, _Table]:
    """The packaged rt-snippets-4way: id, mean rating, text per line; split by id, 0-rated rows left out."""
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, list[str]] = {s: [] for s in SPLITS}
    lines: dict[str, list[int]] = {s: [] for s in SPLITS}
    zeros = 0
    for lineno, line in enumerate(_decode(path.read_bytes(), path).splitlines(), 1):
        if not line:
            continue
        sid, rating, text = line.split("\t")
        r = float(rating)
        if r == 0:
            zeros += 1
            continue
        split = "test" if int(sid) % 10 == 0 else "validation" if int(sid) % 10 == 1 else "train"
        texts[split].append(text)
        labels[split].append(_RT_LABELS[0 if r <= -2 else 1 if r < 0 else 2 if r < 2 else 3])
        lines[split].append(lineno)
    say(f"rt-snippets-4way: left out {zeros} snippets rated exactly 0 (neither negative nor positive)")
    return {s: _Table(f"{path} ({s})", {"text": texts[s], "label": labels[s]}, ["text", "label"],
                      len(texts[s]), lines[s]) for s in SPLITS}


# ---------------------------------------------------------------------------------------------- columns


@dataclass
class _Columns:
    text: str
    pair: str | None
    label: str
    label_type: str
    empty_text: str

    def names(self) -> list[str]:
        return [n for n in (self.text, self.pair, self.label) if n is not None]


@dataclass
class _Rows:
    """One split after checks: the kept rows' texts and raw labels."""

    table: _Table
    keep: list[int]  # table row of each kept row
    texts: list[str]
    pairs: list[str] | None
    raw_labels: list[Any]
    label_column: str


def _require_columns(t: _Table, cols: _Columns) -> None:
    for role, name in (("text_column", cols.text), ("text_pair_column", cols.pair), ("label_column", cols.label)):
        if name is not None and name not in t.columns:
            raise DataError(f"{t.source} has no column {name!r} (data.{role}); its columns are "
                            f"{', '.join(map(repr, t.present))}: set data.{role} to one of them")


def _text_at(t: _Table, name: str, i: int, required: bool) -> str:
    v = t.columns[name][i]
    if v is _MISSING or v is None:
        if required:
            raise DataError(f"{t.where(i)} has no {name!r}; every row of a pair task needs both texts")
        return ""
    if not isinstance(v, str):
        raise DataError(f"{t.where(i)}: {name!r} is {v!r}, not a string; quote the text")
    return v


def _select_rows(t: _Table, cols: _Columns, say: Callable[[str], None]) -> _Rows:
    """Checks the columns and texts of one table; drops (or rejects) rows with an empty text."""
    _require_columns(t, cols)
    keep, texts, pairs, skipped = [], [], [] if cols.pair else None, []
    for i in range(t.num_rows):
        a = _text_at(t, cols.text, i, required=False)
        b = _text_at(t, cols.pair, i, required=True) if cols.pair else None
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
    return _Rows(t, keep, texts, pairs, labels, cols.label)


# ---------------------------------------------------------------------------------------------- labels


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


def _infer_label_type(r: _Rows) -> str:
    """auto: lists -> multi, whole numbers -> int, other numbers -> float, anything else -> string."""
    values = r.raw_labels
    for j, v in enumerate(values):
        if v is None or v is _MISSING or (isinstance(v, str) and not v.strip()):
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


def _missing_label(r: _Rows, j: int) -> DataError:
    return DataError(f"{r.table.where(r.keep[j])} has no label in {r.label_column!r}; fill it or drop the row")


def _class_key(r: _Rows, j: int, kind: str) -> str:
    v = r.raw_labels[j]
    if v is None or v is _MISSING or (isinstance(v, str) and not v.strip()):
        raise _missing_label(r, j)
    if kind == "int":
        n = _parse_number(v)
        if n is None or not float(n).is_integer():
            raise DataError(f"{r.table.where(r.keep[j])}: label {v!r} is not a whole number (data.label_type: "
                            f"int); fix the row or change data.label_type")
        return str(int(n))
    return v.strip() if isinstance(v, str) else str(v)


def _float_label(r: _Rows, j: int) -> float:
    v = r.raw_labels[j]
    if v is None or v is _MISSING:
        raise _missing_label(r, j)
    n = _parse_number(v)
    if n is None or not math.isfinite(n):
        raise DataError(f"{r.table.where(r.keep[j])}: regression label {v!r} is not a finite number; fix or "
                        f"drop the row")
    return n


def _multi_items(r: _Rows, j: int) -> list:
    items = _as_list(r.raw_labels[j])
    if items is None:
        raise DataError(f"{r.table.where(r.keep[j])}: multi-label value {r.raw_labels[j]!r} is not a list; write "
                        f"a list of label names or of 0/1 flags, e.g. [\"a\", \"b\"] or [0, 1, 1]")
    return items


def _is_flags(rows: _Rows) -> bool:
    lists = [_multi_items(rows, j) for j in range(len(rows.keep))]
    sizes = {len(x) for x in lists}
    return len(sizes) == 1 and 0 not in sizes and all(
        isinstance(v, (int, bool)) and v in (0, 1) for x in lists for v in x)


def _unseen(r: _Rows, j: int, name: str) -> DataError:
    return DataError(f"{r.table.where(r.keep[j])}: label {name!r} never appears in the training data; fix the "
                     f"row, drop it, or add training examples of it")


def _encode_multi(r: _Rows, names: list[str], flags: bool) -> np.ndarray:
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


def _encode_labels(rows: dict[str, _Rows], label_type: str, fixed_names: list[str] | None,
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


# ---------------------------------------------------------------------------------------------- tokenizing


def load_tokenizer(model_dir: Path, max_length: int):
    """The model's fast tokenizer (a `tokenizers.Tokenizer`) set to truncate to max_length, never pad."""
    if not any((model_dir / n).is_file() for n in ("tokenizer.json", "vocab.txt")):
        raise DataError(f"model folder {model_dir} has no tokenizer.json or vocab.txt; save the tokenizer "
                        f"with the model (tokenizer.save_pretrained)")
    tok = _bert_tokenizer_json(model_dir)
    if tok is None:  # no tokenizer.json, or one that BertTokenizerFast would adjust: let transformers build it
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(model_dir)).backend_tokenizer
    tok.no_padding()
    tok.enable_truncation(max_length=max_length, strategy="longest_first")
    return tok


# BertTokenizerFast's arguments (with its defaults) and the normalizer fields it rebuilds them into.
_BERT_NORMALIZER = {"do_lower_case": ("lowercase", True), "strip_accents": ("strip_accents", None),
                    "tokenize_chinese_chars": ("handle_chinese_chars", True)}


def _bert_tokenizer_json(model_dir: Path):
    """tokenizer.json loaded directly (fast: no transformers import) when it is a BERT tokenizer that
    BertTokenizerFast would use unchanged; otherwise None."""
    from tokenizers import Tokenizer

    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if not (model_dir / "tokenizer.json").is_file() or cfg.get("tokenizer_class", "BertTokenizer") not in (
            "BertTokenizer", "BertTokenizerFast"):
        return None
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    norm = json.loads(tok.normalizer.__getstate__()) if tok.normalizer is not None else {}
    for arg, (key, default) in _BERT_NORMALIZER.items():
        if norm.get(key, cfg.get(arg, default)) != cfg.get(arg, default):
            return None
    return tok


def _tokenize(tok, texts: list[str], pairs: list[str] | None) -> dict[str, np.ndarray]:
    """Encodes rows in chunks; returns the concatenated ids, type ids and row offsets."""
    encode = getattr(tok, "encode_batch_fast", tok.encode_batch)  # _fast skips char offsets (tokenizers>=0.21)
    encs = []
    for start in range(0, len(texts), 4096):
        chunk = texts[start:start + 4096]
        encs += encode(list(zip(chunk, pairs[start:start + 4096], strict=True)) if pairs is not None else chunk)
    ids = [e.ids for e in encs]
    offsets = np.zeros(len(ids) + 1, np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    total = int(offsets[-1])
    flat = itertools.chain.from_iterable
    return {"input_ids": np.fromiter(flat(ids), np.int32, count=total),
            "token_type_ids": np.fromiter(flat(e.type_ids for e in encs), np.int8, count=total),
            "offsets": offsets}


def tokenizer_hash(model_dir: Path) -> str:
    """sha256 over the tokenizer files the model folder has."""
    h = hashlib.sha256()
    for name in _TOKENIZER_FILES:
        if (model_dir / name).is_file():
            h.update(name.encode() + b"\0" + assets.sha256_file(model_dir / name).encode())
    return h.hexdigest()


def _content_hash(texts: list[str], pairs: list[str] | None, tok_hash: str, max_length: int) -> str:
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{tok_hash}|{max_length}|{pairs is not None}|{len(texts)}".encode())
    for i, t in enumerate(texts):
        h.update(t.encode("utf-8", "surrogatepass") + b"\x00")
        if pairs is not None:
            h.update(pairs[i].encode("utf-8", "surrogatepass") + b"\x01")
    return h.hexdigest()


def _cache_load(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in ("input_ids", "token_type_ids", "offsets")}
    except (OSError, KeyError, ValueError):
        return None  # absent or damaged: tokenize again


def _cache_save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes to a temporary file in the same folder, then renames: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; the cache may be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _tokenized(tok, tok_hash: str, texts: list[str], pairs: list[str] | None, max_length: int,
               cache_dir: Path, split: str) -> tuple[dict[str, np.ndarray], bool]:
    key = _content_hash(texts, pairs, tok_hash, max_length)
    path = cache_dir / f"{split}-{key[:40]}.npz"
    hit = _cache_load(path)
    if hit is not None and len(hit["offsets"]) == len(texts) + 1:
        return hit, True
    try:
        arrays = _tokenize(tok, texts, pairs)
    except Exception as e:  # noqa: BLE001 - the Rust tokenizer raises plain Exception
        raise DataError(f"could not tokenize the {split} rows with max_length {max_length} ({e}); raise "
                        f"data.max_length") from None
    _cache_save(path, arrays)
    return arrays, False


# ---------------------------------------------------------------------------------------------- loading


def max_positions(model_dir: Path) -> int | None:
    path = model_dir / "config.json"
    return json.loads(path.read_text()).get("max_position_embeddings") if path.is_file() else None


def _split_tables(cfg: DataConfig, say: Callable[[str], None]) -> tuple[dict[str, _Table], _Columns, list | None]:
    """The tables of the splits present, the columns to use, and the fixed label order of a packaged task."""
    if cfg.train_file is None:
        if cfg.task is None:
            raise DataError("data.task is null and no data.train_file is given: name a packaged task or a file")
        try:
            path = assets.resolve_task(cfg.task)
        except assets.AssetError as e:
            raise DataError(str(e)) from None
        cols = _Columns("text", None, "label", "string", cfg.empty_text)
        return _read_rt_snippets(path, say), cols, list(_RT_LABELS)
    cols = _Columns(cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.label_type, cfg.empty_text)
    files = {s: getattr(cfg, f"{s}_file") for s in SPLITS if getattr(cfg, f"{s}_file") is not None}
    for s, f in files.items():  # every path is checked before any file is read
        if not Path(f).expanduser().exists():
            raise DataError(f"data.{s}_file: {f} does not exist; check the path")
    tables = {s: _read_table(Path(f).expanduser(), cfg.format, s, cols.names()) for s, f in files.items()}
    return tables, cols, None


def _printer(process_index: int) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if process_index == 0:
            print(f"flaxclf.data: {msg}", flush=True)

    return say


def _share(num_rows: int, process_index: int, process_count: int, batch_slots: int | None) -> np.ndarray:
    """This process's rows: its slot block of every global batch of `batch_slots` rows, or rows i % P."""
    if batch_slots is None:
        return np.arange(process_index, num_rows, process_count, dtype=np.int64)
    per = batch_slots // process_count
    i = np.arange(num_rows, dtype=np.int64)
    return i[(i % batch_slots) // per == process_index]


def load_task(cfg: DataConfig, model_dir: Path, process_index: int | None = None,
              process_count: int | None = None, *, train_batch_size: int | None = None,
              ) -> tuple[Task, dict[str, TokenizedSplit]]:
    """Reads, checks and labels every split, then tokenizes (or loads from the cache) this process's share.

    Returns the Task and the splits present among train/validation/test. process_index/process_count
    default to jax's; pass them to load one host's share explicitly. train_batch_size (the global batch size)
    shards the train split into batch slots, as TrainBatches needs on more than one process; None shares it
    as rows i % process_count.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if train_batch_size is not None and (train_batch_size < 1 or train_batch_size % pc):
        raise DataError(f"train.global_batch_size {train_batch_size} does not divide over {pc} processes; use a "
                        f"positive multiple of {pc}")
    model_dir = Path(model_dir)
    limit = max_positions(model_dir)
    if limit is not None and cfg.max_length > limit:
        raise DataError(f"data.max_length {cfg.max_length} is above the model's max_position_embeddings {limit} "
                        f"({model_dir / 'config.json'}); use data.max_length <= {limit}")
    say = _printer(pi)
    tables, cols, fixed = _split_tables(cfg, say)
    rows = {s: _select_rows(t, cols, say) for s, t in tables.items()}
    task, labels = _encode_labels(rows, cols.label_type, fixed)
    tok = load_tokenizer(model_dir, cfg.max_length)
    tok_hash = tokenizer_hash(model_dir)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else assets.cache_root() / "tokenized"
    splits = {}
    for s, r in rows.items():
        slots = train_batch_size if s == "train" else None
        mine = _share(len(r.keep), pi, pc, slots)
        texts = [r.texts[i] for i in mine]
        pairs = [r.pairs[i] for i in mine] if r.pairs is not None else None
        arrays, hit = _tokenized(tok, tok_hash, texts, pairs, cfg.max_length, cache_dir, s)
        splits[s] = TokenizedSplit(s, arrays["input_ids"], arrays["token_type_ids"], arrays["offsets"],
                                   labels[s][mine], mine, len(r.keep), cfg.max_length, pi, pc, hit, slots)
    return task, splits


# ---------------------------------------------------------------------------------------------- batches


def bucket_lengths(buckets: Sequence[int], max_length: int) -> list[int]:
    """The padded lengths batches use: the buckets clipped to max_length, plus max_length, sorted."""
    return sorted({min(int(b), max_length) for b in buckets} | {max_length})


def _bucket_members(split: TokenizedSplit, lengths: list[int]) -> list[np.ndarray]:
    """Row indices of each bucket (the smallest padded length that holds the row), in row order."""
    which = np.searchsorted(np.asarray(lengths), split.lengths, side="left")
    return [np.flatnonzero(which == k) for k in range(len(lengths))]


def _allgather_counts(local: np.ndarray) -> np.ndarray:
    """[process_count, K] counts from every process's [K] counts (one process: its own, as [1, K])."""
    gathered = multihost_utils.process_allgather(np.asarray(local, np.int64))
    return np.asarray(gathered).reshape(-1, len(local))


def _slot_members(split: TokenizedSplit, global_batch: int, lengths: list[int]) -> list[list[np.ndarray]]:
    """Local row indices of each of this process's slots (outer) in each bucket (inner), in row order."""
    per = global_batch // split.process_count
    slot = split.rows % global_batch - split.process_index * per
    key = slot * len(lengths) + np.searchsorted(np.asarray(lengths), split.lengths, side="left")
    groups = np.split(np.argsort(key, kind="stable"), np.cumsum(np.bincount(key, minlength=per * len(lengths)))[:-1])
    return [groups[s * len(lengths):(s + 1) * len(lengths)] for s in range(per)]


def train_batch_counts(counts_SxK: np.ndarray) -> np.ndarray:
    """Training batches per bucket from every slot's row count per bucket: n_k = the fewest rows any slot has
    for bucket k, counting the rows it promotes from bucket k - 1 (those beyond n_{k-1})."""
    n_K = np.zeros(counts_SxK.shape[1], np.int64)
    carry_S = np.zeros(counts_SxK.shape[0], np.int64)
    for k in range(len(n_K)):
        avail_S = carry_S + counts_SxK[:, k]
        n_K[k] = avail_S.min()
        carry_S = avail_S - n_K[k]
    return n_K


def _rng(seed: int, epoch: int, slot: int | None = None) -> np.random.Generator:
    # slot + 1: a SeedSequence ignores trailing zero words, so [seed, epoch, 0] would repeat [seed, epoch]
    return np.random.default_rng([seed % 2**32, epoch] + ([] if slot is None else [slot + 1]))


def _slot_epoch(members_K: list[np.ndarray], n_K: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One slot's rows for the n_k batches of each bucket: the bucket's rows and those promoted from the bucket
    below, shuffled; the rest move up a bucket, and the last bucket's rest is left out this epoch."""
    out, carry = [], members_K[0][:0]
    for members, n in zip(members_K, n_K, strict=True):
        pool = rng.permutation(np.concatenate([carry, members]))
        out.append(pool[:n])
        carry = pool[n:]
    return out


def train_epoch_plan(slots: list[list[np.ndarray]], first_slot: int, n_K: np.ndarray, seed: int,
                     epoch: int) -> list[tuple[int, np.ndarray]]:
    """(bucket index, local row indices) of each step of an epoch for the slots first_slot, first_slot + 1, ...

    Global batch j of bucket k is row j of every slot's bucket-k rows in slot order, so a process's rows are its
    block of the global batch, and the global batches are the same for any number of processes.
    """
    order = np.repeat(np.arange(len(n_K)), n_K)
    _rng(seed, epoch).shuffle(order)
    per_slot = [_slot_epoch(members, n_K, _rng(seed, epoch, first_slot + s)) for s, members in enumerate(slots)]
    chunks = [iter(np.stack([rows[k] for rows in per_slot], axis=1)) for k in range(len(n_K))]  # [n_k, slots]
    return [(int(k), next(chunks[k])) for k in order]


def eval_batch_counts(counts_PxK: np.ndarray, local_batch: int) -> np.ndarray:
    """Evaluation batches per bucket so every row is seen: max over processes of ceil(count / local_batch)."""
    return (-(-counts_PxK // local_batch)).max(axis=0)


def _batch_shards(sharding: jax.sharding.NamedSharding) -> int:
    """How many ways the sharding splits the batch axis (the product of the mesh axes named for axis 0)."""
    first = sharding.spec[0] if len(sharding.spec) else None
    names = () if first is None else (first if isinstance(first, tuple) else (first,))
    return math.prod(sharding.mesh.shape[n] for n in names)


def local_batch_size(global_batch_size: int, sharding: jax.sharding.NamedSharding | None,
                     process_count: int) -> int:
    """The rows each process contributes to a global batch; errors when the batch doesn't divide evenly."""
    shards = _batch_shards(sharding) if sharding is not None else 1
    if global_batch_size % shards:
        raise DataError(f"global batch size {global_batch_size} does not divide over the {shards} batch shards of "
                        f"the mesh (data x fsdp); use a multiple of {shards}")
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} does not divide over {process_count} processes; "
                        f"use a multiple of {process_count}")
    return global_batch_size // process_count


def _host_batch(split: TokenizedSplit, idx: np.ndarray, length: int, local_batch: int) -> dict[str, np.ndarray]:
    """Rows `idx` padded to `length`, plus masked filler rows (weight 0) up to local_batch."""
    n = len(idx)
    lens = np.zeros(local_batch, np.int64)
    lens[:n] = split.lengths[idx]
    starts = np.zeros(local_batch, np.int64)
    starts[:n] = split.offsets[idx]
    pos = np.arange(length)
    mask_BxL = pos[None, :] < lens[:, None]
    gather_BxL = np.where(mask_BxL, starts[:, None] + pos[None, :], 0)
    ids = split.input_ids[gather_BxL] if split.input_ids.size else np.zeros_like(gather_BxL)
    types = split.token_type_ids[gather_BxL] if split.input_ids.size else np.zeros_like(gather_BxL)
    mask_BxL[n:, 0] = True  # filler rows attend to one position so no attention row is all masked
    labels = np.zeros((local_batch,) + split.labels.shape[1:], split.labels.dtype)
    labels[:n] = split.labels[idx]
    weight = np.zeros(local_batch, np.float32)
    weight[:n] = 1.0
    return {"input_ids": np.where(mask_BxL, ids, 0).astype(np.int32),
            "attention_mask": mask_BxL.astype(np.int32),
            "token_type_ids": np.where(mask_BxL, types, 0).astype(np.int32),
            "labels": labels, "weight": weight}


def _place(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding | None, global_batch: int):
    """Host batch -> global jax arrays (or the numpy batch itself when no sharding is given)."""
    if sharding is None:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
            for k, v in batch.items()}


class _Prefetch:
    """Runs an iterator in a background thread, `size` items ahead; re-raises its errors in the consumer."""

    _END = object()

    def __init__(self, it: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._finished: Any = None
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(e)

    def __next__(self) -> Any:
        item = self._finished or self._queue.get()
        if item is self._END:
            self._finished = item
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = item
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _check_processes(split: TokenizedSplit) -> None:
    if (split.process_index, split.process_count) != (jax.process_index(), jax.process_count()):
        raise DataError(f"the {split.name} split was loaded as process {split.process_index} of "
                        f"{split.process_count} but this is process {jax.process_index()} of "
                        f"{jax.process_count()}; load it with the default process_index/process_count")


def _check_slots(split: TokenizedSplit, global_batch: int) -> None:
    if split.process_count > 1 and split.batch_slots != global_batch:
        loaded = "without train_batch_size" if split.batch_slots is None else f"for batch size {split.batch_slots}"
        raise DataError(f"the {split.name} split was loaded {loaded} but batches have {global_batch} rows; load it "
                        f"with load_task(..., train_batch_size={global_batch})")


class TrainBatches:
    """Global training batches, epoch after epoch, fixed by (seed, epoch) whatever the process count; resumable.

    Every process must construct it at the same time (it agrees on per-slot counts with the others). Each epoch
    has `steps_per_epoch` = N // B batches of B = `global_batch_size` rows and leaves out
    `rows_dropped_per_epoch` = N % B rows (see the module docstring). With sharding=None it yields numpy host
    batches.
    """

    def __init__(self, split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int], seed: int,
                 sharding: jax.sharding.NamedSharding | None, start_state: dict | None = None,
                 prefetch: int = 2, num_epochs: int | None = None):
        _check_processes(split)
        self.split, self.seed, self.sharding = split, seed, sharding
        self.global_batch_size, self.prefetch, self.num_epochs = global_batch_size, prefetch, num_epochs
        self.local_batch = local_batch_size(global_batch_size, sharding, split.process_count)
        _check_slots(split, global_batch_size)
        self.bucket_lengths = bucket_lengths(buckets, split.max_length)
        self._slots = _slot_members(split, global_batch_size, self.bucket_lengths)
        self.first_slot = split.process_index * self.local_batch
        local_SxK = np.array([[len(m) for m in slot] for slot in self._slots])
        counts_SxK = _allgather_counts(local_SxK.ravel()).reshape(global_batch_size, -1)  # processes own blocks
        self.batches_per_bucket = train_batch_counts(counts_SxK)
        self.steps_per_epoch = int(self.batches_per_bucket.sum())
        self.rows_dropped_per_epoch = int(counts_SxK.sum()) - self.steps_per_epoch * global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {split.num_rows_total} rows, fewer than one batch of "
                            f"{global_batch_size}; lower train.global_batch_size")
        self._epoch, self._step = 0, 0
        self._source: _Prefetch | Iterator | None = None
        if start_state is not None:
            self.restore(start_state)

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket index, local row indices) of each step of an epoch; the bucket order is the same everywhere."""
        return train_epoch_plan(self._slots, self.first_slot, self.batches_per_bucket, self.seed, epoch)

    def _host_stream(self, epoch: int, step: int) -> Iterator[tuple[int, int, dict]]:
        while self.num_epochs is None or epoch < self.num_epochs:
            for s, (k, idx) in enumerate(self.epoch_plan(epoch)[step:], start=step):
                batch = _host_batch(self.split, idx, self.bucket_lengths[k], self.local_batch)
                yield epoch, s, _place(batch, self.sharding, self.global_batch_size)
            epoch, step = epoch + 1, 0

    def _open(self) -> Iterator:
        stream = self._host_stream(self._epoch, self._step)
        return _Prefetch(stream, self.prefetch) if self.prefetch > 0 else stream

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        if self._source is None:
            self._source = self._open()
        epoch, step, batch = next(self._source)
        self._epoch, self._step = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
        return batch

    def state(self) -> dict:
        """Where the next batch comes from, as JSON-friendly ints; pass it to restore() or start_state."""
        return {"epoch": self._epoch, "step": self._step, "steps_per_epoch": self.steps_per_epoch,
                "seed": self.seed}

    def restore(self, state: dict) -> None:
        """Continues from a state(): the next batch is the one that would have followed."""
        if state.get("steps_per_epoch") != self.steps_per_epoch or state.get("seed") != self.seed:
            raise DataError(f"the saved data iterator state {state} does not match this run (steps_per_epoch "
                            f"{self.steps_per_epoch}, seed {self.seed}); resume with the same data, batch size "
                            f"and seed")
        self.close()
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def __del__(self) -> None:
        stop = getattr(getattr(self, "_source", None), "_stop", None)
        if stop is not None:  # a dropped iterator must not leave its thread waiting
            stop.set()

    def close(self) -> None:
        """Stops the prefetch thread."""
        if isinstance(self._source, _Prefetch):
            self._source.close()
        self._source = None


def eval_plan(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
              sharding: jax.sharding.NamedSharding | None) -> list[tuple[int, np.ndarray]]:
    """(padded length, local row indices) of each evaluation batch; processes with fewer rows get fillers."""
    _check_processes(split)
    local_batch = local_batch_size(global_batch_size, sharding, split.process_count)
    lengths = bucket_lengths(buckets, split.max_length)
    members = _bucket_members(split, lengths)
    counts = eval_batch_counts(_allgather_counts(np.array([len(m) for m in members])), local_batch)
    return [(lengths[k], members[k][b * local_batch:(b + 1) * local_batch])
            for k in range(len(lengths)) for b in range(int(counts[k]))]


def eval_batches(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
                 sharding: jax.sharding.NamedSharding | None, prefetch: int = 2) -> Iterator[dict]:
    """Every row of the split exactly once (fields as in training; filler rows have weight 0).

    Every process must call it at the same time (it agrees on per-bucket counts with the others).
    """
    plan = eval_plan(split, global_batch_size, buckets, sharding)
    local_batch = global_batch_size // split.process_count
    stream = (_place(_host_batch(split, idx, length, local_batch), sharding, global_batch_size)
              for length, idx in plan)
    return _prefetched(stream, prefetch) if prefetch > 0 else stream


def _prefetched(stream: Iterator, size: int) -> Iterator:
    source = _Prefetch(stream, size)
    try:
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            yield item
    finally:
        source.close()
