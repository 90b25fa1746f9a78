"""Files -> tables of columns, and the texts `flaxclf predict` reads.

CSV or TSV (a header row, then one row a record), JSONL (one object a line), Parquet, or a Hugging Face
``datasets`` folder written by ``save_to_disk`` (a Dataset, or a DatasetDict whose split of the same name is
used). CSV and TSV are read as Python's csv module and pandas write them, the delimiter aside: a field in double
quotes may hold the delimiter, tabs, line breaks and ``""`` for a quote, so ``df.to_csv(path)`` and
``df.to_csv(path, sep="\\t")`` files read back as written (pandas' index column has an empty name: it is never
used). Text files must be UTF-8; a BOM is dropped and CRLF line ends are fine. Messages name a row by the file
line where it starts (text formats) or by its number (Parquet, folders).
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flaxclf.data.types import SPLITS, DataError
from flaxclf.options import EXTENSIONS, FILE_FORMATS, INPUT_FORMATS

RT_LABELS = ["very negative", "negative", "positive", "very positive"]
MISSING = object()  # a JSONL key absent from one row
# Appended to CSV/TSV text: a quoted field that swallows it was never closed (the csv module would keep the rest
# of the file as that field, where pandas refuses the file).
_END = "\ue000flaxclf end of file\ue000"


@dataclass
class Table:
    """Columns read from one file, before any check of their values."""

    source: str  # how messages name the file
    columns: dict[str, list[Any]]  # only the columns that were asked for and exist
    present: list[str]  # every column the file has
    num_rows: int
    lines: list[int] | None = None  # the file line where each row starts (text formats); None: rows by number

    def locator(self, i: int) -> str:
        return f"line {self.lines[i]}" if self.lines is not None else f"row {i + 1}"

    def where(self, i: int) -> str:
        return f"{self.source} {self.locator(i)}"

    def require(self, named: list[tuple[str, str | None]]) -> None:
        """Errors unless the table has the column of every (setting, column); a None column is not asked for."""
        for setting, name in named:
            if name is not None and name not in self.columns:
                raise DataError(f"{self.source} has no column {name!r} ({setting}); its columns are "
                                f"{', '.join(map(repr, self.present))}: set {setting} to one of them")

    def text(self, name: str, i: int) -> str | None:
        """Row i's text in column `name`; None where the row has no value there (a JSONL key left out, a null)."""
        v = self.columns[name][i]
        if v is MISSING or v is None:
            return None
        if not isinstance(v, str):
            raise DataError(f"{self.where(i)}: {name!r} is {v!r}, not a string; quote the text")
        return v


def decode(raw: bytes, source: str) -> str:
    """UTF-8 bytes as text without a leading BOM; a byte that is not UTF-8 is an error naming its line."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{source} line {line}: byte 0x{raw[e.start]:02x} is not valid UTF-8; save the file "
                        f"as UTF-8") from None
    return text.removeprefix("\ufeff")


def _lines(text: str) -> list[str]:
    # Only \n, \r\n and \r end a line: str.splitlines() also splits at U+2028, U+0085 and others a text may hold.
    return text.replace("\r\n", "\n").replace("\r", "\n").split("\n")


def _records(source: str, text: str, delimiter: str) -> Iterator[tuple[int, list[str]]]:
    """(the line where it starts, its fields) of every row that is not blank."""
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # pandas has no such limit: long texts must read
    end = "" if text.endswith(("\n", "\r")) else "\n"
    reader = csv.reader(io.StringIO(text + end + _END, newline=""), delimiter=delimiter)
    start = 1
    for row in reader:
        if row and row[-1].endswith(_END):
            if row != [_END]:
                raise DataError(f"{source} line {start}: a quoted field that starts in this row is never closed; "
                                f"close the quote, and double each quote inside a quoted field (\"\")")
            return
        if row:
            yield start, row
        start = reader.line_num + 1


def _column_index(header: list[str], source: str) -> dict[str, int]:
    """Column name -> position; an empty name (pandas' index column) is left out, a repeated one refused."""
    index: dict[str, int] = {}
    for j, name in enumerate(header):
        if name in index:
            raise DataError(f"{source}: the header names column {name!r} twice; rename or drop one of them")
        if name:
            index[name] = j
    return index


def _read_delimited(source: str, text: str, wanted: list[str], delimiter: str) -> Table:
    if not text.strip():
        raise DataError(f"{source} is empty; give a file with a header and at least one row")
    records = _records(source, text, delimiter)
    _, header = next(records)
    index = _column_index(header, source)
    cells: list[list[str]] = []
    lines: list[int] = []
    for line, row in records:
        if len(row) != len(header):
            raise DataError(f"{source} line {line}: {len(row)} fields but the header has {len(header)}; fix the "
                            f"row (quote a field that holds the delimiter, and double each quote inside it)")
        cells.append(row)
        lines.append(line)
    if not cells:
        raise DataError(f"{source} has a header but no rows; add data rows")
    cols = {n: [r[index[n]] for r in cells] for n in wanted if n in index}
    return Table(source, cols, list(index), len(cells), lines)


def _read_jsonl(source: str, text: str, wanted: list[str]) -> Table:
    if not text.strip():
        raise DataError(f"{source} is empty; give a file with at least one row")
    records, lines, present = [], [], {}
    for lineno, line in enumerate(_lines(text), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{source} line {lineno} is not valid JSON ({e.msg}); write one object a line") from None
        if not isinstance(rec, dict):
            raise DataError(f"{source} line {lineno} is a {type(rec).__name__}, not an object; write one "
                            f"{{\"column\": value}} object a line")
        present.update(dict.fromkeys(rec))
        records.append(rec)
        lines.append(lineno)
    cols = {n: [r.get(n, MISSING) for r in records] for n in wanted if n in present}
    return Table(source, cols, list(present), len(records), lines)


def _read_parquet(source: str, file: io.BytesIO, wanted: list[str]) -> Table:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except (OSError, ValueError) as e:  # arrow's ArrowInvalid / ArrowIOError
        raise DataError(f"{source} is not a readable Parquet file ({type(e).__name__}); check the format") from None
    if table.num_rows == 0:
        raise DataError(f"{source} has no rows; give a file with at least one row")
    cols = {n: table.column(n).to_pylist() for n in wanted if n in table.column_names}
    return Table(source, cols, table.column_names, table.num_rows)


def _read_hf_disk(path: Path, wanted: list[str], split: str) -> Table:
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
    return Table(str(path), cols, list(ds.column_names), len(ds))


def _format_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        return fmt
    if path.is_dir():
        return "hf_disk"
    if path.suffix.lower() in EXTENSIONS:
        return EXTENSIONS[path.suffix.lower()]
    raise DataError(f"cannot tell the format of {path} from its extension {path.suffix!r}; set data.format to "
                    f"one of {', '.join(FILE_FORMATS)}")


def read_table(path: Path, fmt: str | None, split: str, wanted: list[str]) -> Table:
    """The `wanted` columns of data.{split}_file, in `fmt` (None: from the extension, or hf_disk for a folder)."""
    if not path.exists():
        raise DataError(f"data.{split}_file: {path} does not exist; check the path")
    fmt = _format_of(path, fmt)
    if fmt == "hf_disk":
        return _read_hf_disk(path, wanted, split)
    if path.is_dir():
        raise DataError(f"data.{split}_file: {path} is a folder, not a {fmt} file; name the file")
    return _parse(str(path), fmt, path.read_bytes(), wanted)


def _parse(source: str, fmt: str, raw: bytes, wanted: list[str]) -> Table:
    """The `wanted` columns of a file's bytes in a tabular format (csv, tsv, jsonl, parquet)."""
    if fmt == "parquet":
        return _read_parquet(source, io.BytesIO(raw), wanted)
    text = decode(raw, source)
    if fmt == "jsonl":
        return _read_jsonl(source, text, wanted)
    return _read_delimited(source, text, wanted, "\t" if fmt == "tsv" else ",")


def read_rt_snippets(path: Path, say: Callable[[str], None]) -> dict[str, Table]:
    """The packaged rt-snippets-4way: id, mean rating, text per line; split by id, 0-rated rows left out."""
    texts: dict[str, list[str]] = {s: [] for s in SPLITS}
    labels: dict[str, list[str]] = {s: [] for s in SPLITS}
    lines: dict[str, list[int]] = {s: [] for s in SPLITS}
    zeros = 0
    for lineno, line in enumerate(decode(path.read_bytes(), str(path)).splitlines(), 1):
        if not line:
            continue
        sid, rating, text = line.split("\t")
        r = float(rating)
        if r == 0:
            zeros += 1
            continue
        split = "test" if int(sid) % 10 == 0 else "validation" if int(sid) % 10 == 1 else "train"
        texts[split].append(text)
        labels[split].append(RT_LABELS[0 if r <= -2 else 1 if r < 0 else 2 if r < 2 else 3])
        lines[split].append(lineno)
    say(f"rt-snippets-4way: left out {zeros} snippets rated exactly 0 (neither negative nor positive)")
    return {s: Table(f"{path} ({s})", {"text": texts[s], "label": labels[s]}, ["text", "label"],
                     len(texts[s]), lines[s]) for s in SPLITS}


def read_texts(path: str, fmt: str | None, text_column: str, pair_column: str | None,
               ) -> tuple[list[str], list[str] | None]:
    """Texts (and pairs) to predict from a file or stdin ("-"): one text a line (blank lines skipped), or the
    columns of a CSV, TSV, JSONL or Parquet file, read as for training. fmt None: from the extension, else lines."""
    if path == "-":
        source, fmt, raw = "stdin", fmt or "lines", sys.stdin.buffer.read()
    else:
        file = Path(path).expanduser()
        if not file.is_file():
            what = "is a folder" if file.is_dir() else "is not a regular file" if file.exists() else "does not exist"
            raise DataError(f"input file {path} {what}; give the path of a file")
        source, fmt, raw = path, fmt or EXTENSIONS.get(file.suffix.lower(), "lines"), file.read_bytes()
    if fmt not in INPUT_FORMATS:
        raise DataError(f"{source}: format {fmt!r} can't be read as input; use {', '.join(INPUT_FORMATS)}")
    if fmt == "lines":
        if pair_column:
            raise DataError(f"{source}: --text-pair-column needs a CSV, TSV, JSONL or Parquet input (--input-format)")
        texts = [line for line in _lines(decode(raw, source)) if line.strip()]
        if not texts:
            raise DataError(f"{source} has no text; give one text a line")
        return texts, None
    table = _parse(source, fmt, raw, [c for c in (text_column, pair_column) if c])
    table.require([("--text-column", text_column), ("--text-pair-column", pair_column)])
    return ([_input_text(table, text_column, i) for i in range(table.num_rows)],
            [_input_text(table, pair_column, i) for i in range(table.num_rows)] if pair_column else None)


def _input_text(table: Table, name: str, i: int) -> str:
    text = table.text(name, i)
    if text is None:
        raise DataError(f"{table.where(i)} has no {name!r}; give every row a text")
    return text
