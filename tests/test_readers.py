"""flaxclf.data.readers: what Python's csv and json modules and pandas write reads back as written, for training
and for predict alike; BOMs, CRLF, stdin, and the messages for a bad header, row or quote."""

import csv
import io
import json
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flaxclf import assets, data
from flaxclf.config import DataConfig
from flaxclf.data import DataError, labels, readers

COLUMNS = ["text", "pair", "label"]
# Characters that delimited formats must quote or that split lines somewhere, then anything UTF-8 can encode.
_TRICKY = st.sampled_from(list("\t\n\r\",' ;\\") + ["\u00e9", "\u4e2d", "\U0001f600", "\u2028", "\x85",
                                                     "\ufeff", "\x0c", "\x1e"])
_CHARS = st.one_of(_TRICKY, st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"))
# A text with no non-space character is an empty text (data.empty_text): tested on its own below.
TEXTS = st.text(_CHARS, min_size=1, max_size=24).filter(str.strip)
LABELS = st.sampled_from(["pos", "neg", "a, b", 'say "hi"', "tab\there", "\u00fcn\u00efcode", " padded "])
ROWS = st.lists(st.tuples(TEXTS, TEXTS, LABELS), min_size=1, max_size=8)


def _csv_quotes_a_bare_cr() -> bool:
    """Older csv.writers left a bare \r unquoted unless it was in lineterminator (CPython gh-67044; fixed in
    3.11.9 and in a later 3.12 patch, so it is probed, not read off the version). pandas writes with "\n": such
    a file splits the field there, in pandas' read_csv as in the csv module."""
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(["a\rb"])
    return out.getvalue().startswith('"')


_BARE_CR_UNQUOTED = not _csv_quotes_a_bare_cr()


def _write_all(folder: Path, rows: list[tuple[str, str, str]]) -> dict[str, Path]:
    """The rows as every writer writes them: csv and json modules, and pandas (index on)."""
    import pandas as pd

    out = {}
    for name, delimiter in (("csv", ","), ("tsv", "\t")):
        out[f"csv-module.{name}"] = folder / f"module.{name}"
        with out[f"csv-module.{name}"].open("w", encoding="utf-8-sig", newline="") as f:  # BOM and CRLF
            w = csv.writer(f, delimiter=delimiter)
            w.writerow(COLUMNS)
            w.writerows(rows)
    for ascii_only in (True, False):
        out[f"json-module-{ascii_only}.jsonl"] = folder / f"module-{ascii_only}.jsonl"
        out[f"json-module-{ascii_only}.jsonl"].write_text(
            "".join(json.dumps(dict(zip(COLUMNS, r, strict=True)), ensure_ascii=ascii_only) + "\n" for r in rows),
            encoding="utf-8")
    df = pd.DataFrame(rows, columns=COLUMNS)
    out["pandas.jsonl"] = folder / "pandas.jsonl"
    df.to_json(out["pandas.jsonl"], orient="records", lines=True)
    if not (_BARE_CR_UNQUOTED and any("\r" in field for row in rows for field in row)):
        out["pandas.csv"], out["pandas.tsv"] = folder / "pandas.csv", folder / "pandas.tsv"
        df.to_csv(out["pandas.csv"])
        df.to_csv(out["pandas.tsv"], sep="\t")
    return out


@settings(max_examples=60, deadline=None)
@given(ROWS)
def test_what_csv_json_and_pandas_write_reads_back_as_written(rows):
    texts, pairs, names = ([r[k] for r in rows] for k in range(3))
    with tempfile.TemporaryDirectory() as folder:
        for writer, path in _write_all(Path(folder), rows).items():
            table = readers.read_table(path, None, "train", COLUMNS)
            assert table.num_rows == len(rows) and "" not in table.present, writer
            assert [table.columns[c] for c in COLUMNS] == [texts, pairs, names], writer
            kept = labels.select_rows(table, labels.Columns("text", "pair", "label", "string", "error"), print)
            assert (kept.texts, kept.pairs, kept.raw_labels) == (texts, pairs, names), writer
            assert readers.read_texts(str(path), None, "text", "pair") == (texts, pairs), writer


def test_bom_and_crlf_csv(tmp_path):
    path = tmp_path / "t.csv"
    path.write_bytes(b'\xef\xbb\xbftext,label\r\n"a, b\r\nc",x\r\n\r\nd \xc3\xa9 ,y\r\n')
    table = readers.read_table(path, None, "train", ["text", "label"])
    assert table.present == ["text", "label"]  # no BOM in the first name
    assert table.columns == {"text": ["a, b\r\nc", "d \u00e9 "], "label": ["x", "y"]}
    assert table.lines == [2, 5]  # where each row starts; the blank line is skipped


def _pandas_tsv(tmp_path) -> tuple[Path, list[str]]:
    import pandas as pd

    texts = ['two\nlines and a\ttab', 'a "quoted" word', "plain", " spaced "]
    path = tmp_path / "train.tsv"
    pd.DataFrame({"text": texts, "label": ["b", "a", "b", "c"]}).to_csv(path, sep="\t")
    return path, texts


def test_pandas_tsv_trains_and_predicts_the_same_texts(tmp_path):
    path, texts = _pandas_tsv(tmp_path)
    assert path.read_text().startswith("\ttext\tlabel\n")  # pandas' unnamed index column
    cfg = DataConfig(task=None, train_file=str(path), cache_dir=str(tmp_path / "cache"))
    task, splits = data.load_task(cfg, assets.resolve_model("minilm-l6"), 0, 1)
    assert task.label_names == ["a", "b", "c"] and splits["train"].labels.tolist() == [1, 0, 1, 2]
    table = readers.read_table(path, None, "train", ["text", "label"])
    assert table.present == ["text", "label"] and table.columns["text"] == texts
    assert data.read_texts(str(path), None, "text", None) == (texts, None)


def test_stdin_is_read_as_utf8_bytes(monkeypatch):
    def stdin(raw: bytes):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(raw), encoding="latin-1"))

    stdin(b"\xef\xbb\xbf" + "first\r\n\r\n  \nsecond \u00e9\u2028kept\n".encode())
    assert data.read_texts("-", None, "text", None) == (["first", "second \u00e9\u2028kept"], None)
    stdin(b'review,other\r\n"x, y",1\r\n')
    assert data.read_texts("-", "csv", "review", None) == (["x, y"], None)
    stdin(b"ok\n\xff\n")
    with pytest.raises(DataError, match="stdin line 2: byte 0xff is not valid UTF-8"):
        data.read_texts("-", None, "text", None)
    stdin(b" \n\n")
    with pytest.raises(DataError, match="stdin has no text"):
        data.read_texts("-", None, "text", None)


def _refused(tmp_path, name: str, body: str, match: str) -> str:
    path = tmp_path / name
    path.write_text(body, encoding="utf-8")
    with pytest.raises(DataError, match=match) as train:
        readers.read_table(path, None, "train", ["text", "label"])
    with pytest.raises(DataError, match=match) as predict:
        data.read_texts(str(path), None, "text", None)
    assert str(train.value) == str(predict.value) and "\n" not in str(train.value)
    return str(train.value)


def test_duplicate_header_is_refused(tmp_path):
    msg = _refused(tmp_path, "d.csv", "text,label,text\na,b,c\n", "header names column 'text' twice")
    assert "rename or drop one" in msg
    path = tmp_path / "two-unnamed.tsv"  # several empty names (pandas' index levels) are fine
    path.write_text("\t\ttext\tlabel\n0\t1\thi\tx\n")
    assert readers.read_table(path, None, "train", ["text"]).columns == {"text": ["hi"]}


def test_wrong_field_count_names_the_line_where_the_row_starts(tmp_path):
    msg = _refused(tmp_path, "w.csv", 'text,label\n"two\nlines",a\nb,c,d\n', r"w\.csv line 4: 3 fields")
    assert "the header has 2" in msg and "quote a field" in msg
    _refused(tmp_path, "w.tsv", 'text\tlabel\nok\tx\n"starts\there\nand ends"\ty\tz\n', r"w\.tsv line 3: 3 fields")


def test_a_quote_never_closed_names_its_line(tmp_path):
    msg = _refused(tmp_path, "q.csv", 'text,label\na,b\n"never closed,c\nd,e\n', r"q\.csv line 3: a quoted field")
    assert "never closed" in msg


def test_empty_texts_are_refused_or_skipped_in_training_and_kept_for_predict(tmp_path):
    path = tmp_path / "e.csv"
    path.write_text('text,label\nfine,a\n"  ",b\n,b\n" \n ",a\n')
    table = readers.read_table(path, None, "train", ["text", "label"])
    assert table.columns["text"] == ["fine", "  ", "", " \n "]
    with pytest.raises(DataError, match=r"e\.csv line 3 has an empty text; .*data\.empty_text: skip"):
        labels.select_rows(table, labels.Columns("text", None, "label", "auto", "error"), print)
    said: list[str] = []
    rows = labels.select_rows(table, labels.Columns("text", None, "label", "auto", "skip"), said.append)
    assert rows.texts == ["fine"] and said == [f"{path}: skipped 3 rows with an empty text (line 3, line 4, line 5)"]
    # predict writes one output row per input row, so it keeps them
    assert data.read_texts(str(path), None, "text", None) == (["fine", "  ", "", " \n "], None)


def test_predict_input_messages(tmp_path):
    with pytest.raises(DataError, match=r"input file .*nope\.csv does not exist"):
        data.read_texts(str(tmp_path / "nope.csv"), None, "text", None)
    path = tmp_path / "x.jsonl"
    path.write_text('{"review": "fine"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl has no column 'text' \(--text-column\); its columns are "
                                        r"'review'"):
        data.read_texts(str(path), None, "text", None)
    path.write_text('{"text": "a", "b": "x"}\n{"text": "c"}\n')
    with pytest.raises(DataError, match=r"x\.jsonl line 2 has no 'b'"):
        data.read_texts(str(path), None, "text", "b")
    lines = tmp_path / "x.txt"
    lines.write_text("one\n")
    with pytest.raises(DataError, match="--text-pair-column needs a CSV"):
        data.read_texts(str(lines), None, "text", "b")


def test_cli_reports_a_bad_input_in_one_line(tmp_path, capsys):
    from flaxclf.cli import main

    assert main(["predict", "minilm-l6", str(tmp_path / "nope.txt")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"flaxclf predict: error: input file {tmp_path / 'nope.txt'} does not exist; give the path of "
                   f"a file"]


def test_parquet_input_for_predict(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"a": ["x, one", "two\nlines"], "b": ["p", "q"], "n": [1, 2]}), path)
    assert data.read_texts(str(path), None, "a", "b") == (["x, one", "two\nlines"], ["p", "q"])
    with pytest.raises(DataError, match=r"in\.parquet row 1: 'n' is 1, not a string"):
        data.read_texts(str(path), None, "n", None)
