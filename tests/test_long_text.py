"""data.long_text: head_tail and chunks against `tokenizers` itself, the per-text aggregation by hand, and the
commands end to end on long texts (train, resume, evaluate, predict), where every metric counts texts."""

import json
from pathlib import Path

import numpy as np
import pytest

from flaxclf.data import long_text, tokens
from flaxclf.data.long_text import LongText
from flaxclf.options import MULTI, SINGLE
from tests.helpers import ROOT, f32_bound, flaxclf, ok, refused, tree_hash

WORDS = ("the film was good bad slow moving great dull funny plot actor scene boring brilliant awful story "
         "characters ending music").split()


def _texts(n: int, seed: int, lo: int = 1, hi: int = 120) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(lo, hi)))) for _ in range(n)]


def _rows(arrays: dict) -> list[list[int]]:
    o = arrays["offsets"]
    return [arrays["input_ids"][o[i]:o[i + 1]].tolist() for i in range(len(o) - 1)]


@pytest.mark.hf
@pytest.mark.parametrize("max_length,stride", [(16, 4), (16, 0), (24, 10), (32, 13), (128, 32)])
def test_chunks_are_the_windows_tokenizers_gives_with_stride_and_overflowing_tokens(minilm_dir, max_length, stride):
    edges = [" ".join(["good"] * n) for n in (max_length - 2, max_length - 1)]  # one window; just two
    texts = _texts(40, 0, 1, 4 * max_length) + ["x", "a b", *edges]
    ours = tokens.tokenize(tokens.load_tokenizer(minilm_dir, max_length), texts, None,
                           LongText("chunks", max_length, stride))
    ref = tokens.load_tokenizer(minilm_dir, max_length)
    ref.enable_truncation(max_length, stride=stride)
    want, want_doc = [], []
    for i, text in enumerate(texts):
        enc = ref.encode(text)
        windows = [enc, *enc.overflowing]
        assert all(not w.overflowing for w in windows[1:])
        want += [w.ids for w in windows]
        want_doc += [i] * len(windows)
    assert _rows(ours) == want
    assert ours["doc"].tolist() == want_doc
    assert len(set(want_doc)) == len(texts) and len(want) > 2 * len(texts)  # the texts really are long
    assert not ours["token_type_ids"].any()
    full = tokens.load_tokenizer(minilm_dir, 10_000)
    assert ours["full_lengths"].tolist() == [len(full.encode(t).ids) for t in texts]


@pytest.mark.hf
@pytest.mark.parametrize("head_tokens", [None, 0, 5, 14])
def test_head_tail_keeps_exactly_the_first_and_last_tokens_asked_for(minilm_dir, head_tokens):
    max_length, texts = 16, _texts(30, 1) + ["short text", " ".join(["good"] * 14), " ".join(["good"] * 15)]
    ours = _rows(tokens.tokenize(tokens.load_tokenizer(minilm_dir, max_length), texts, None,
                                 LongText("head_tail", max_length, 0, head_tokens)))
    bare = tokens.load_tokenizer(minilm_dir, 10_000)
    cls, sep = bare.token_to_id("[CLS]"), bare.token_to_id("[SEP]")
    room, long_rows = max_length - 2, 0
    head = room // 4 if head_tokens is None else head_tokens
    for text, row in zip(texts, ours, strict=True):
        content = bare.encode(text, add_special_tokens=False).ids
        assert row[0] == cls and row[-1] == sep and cls not in row[1:] and sep not in row[:-1]
        if len(content) <= room:
            assert row == [cls, *content, sep]
        else:
            long_rows += 1
            assert len(row) == max_length
            assert row[1:1 + head] == content[:head]
            assert row[1 + head:-1] == (content[len(content) - (room - head):] if room > head else [])
    assert long_rows > 20


@pytest.mark.hf
def test_a_text_that_fits_one_window_is_its_truncated_row(minilm_dir):
    texts = _texts(50, 2, 1, 12)
    rows = {mode: tokens.tokenize(tokens.load_tokenizer(minilm_dir, 16), texts, None, LongText(mode, 16, 4))
            for mode in ("truncate", "head_tail", "chunks")}
    assert rows["truncate"]["doc"].tolist() == list(range(50))
    assert _rows(rows["chunks"]) == _rows(rows["head_tail"]) == _rows(rows["truncate"])


@pytest.mark.hf
def test_windows_that_leave_no_new_tokens_are_refused(minilm_dir):
    from flaxclf.data import DataError

    with pytest.raises(DataError, match=r"data.stride 14 leaves no new tokens.*use data.stride < 14"):
        tokens.tokenize(tokens.load_tokenizer(minilm_dir, 16), ["a b c"], None, LongText("chunks", 16, 14))
    with pytest.raises(DataError, match="data.head_tokens 15 is more than the 14"):
        tokens.tokenize(tokens.load_tokenizer(minilm_dir, 16), ["a b c"], None, LongText("head_tail", 16, 0, 15))


def test_aggregation_by_hand():
    z = np.array([[1.0, 3.0], [3.0, -1.0], [0.0, 0.0], [2.0, 2.0]], np.float32)
    doc = np.array([7, 7, 2, 7])
    docs, mean, first = long_text.aggregate(SINGLE, "mean_logits", z, doc)
    assert docs.tolist() == [2, 7] and first.tolist() == [2, 0]
    np.testing.assert_allclose(mean, [[0.0, 0.0], [2.0, 4.0 / 3.0]], rtol=1e-7)
    _, mx, _ = long_text.aggregate(SINGLE, "max_prob", z, doc)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    want = [[0.5, 0.5], [max(p[0, 0], p[1, 0], p[3, 0]), max(p[0, 1], p[1, 1], p[3, 1])]]
    # float32 probabilities by hand (numpy's float32 exp differs between CPUs by an ulp or so) against the log of
    # one rounded to float32 and back: float32's bound (tests/helpers.py) of 3 roundings over 2 classes, at 1.
    assert np.abs(np.exp(mx) - np.asarray(want, np.float64)).max() <= f32_bound(3, 2, 1.0)
    _, ml, _ = long_text.aggregate(MULTI, "max_prob", z, doc)
    np.testing.assert_allclose(ml, [[0.0, 0.0], [3.0, 3.0]], rtol=1e-6, atol=1e-6)  # logit of the max sigmoid


# ---------------------------------------------------------------------------------------------- the commands


def _long_csv(path: Path, n: int, seed: int) -> list[str]:
    """Texts of 20-150 words whose label is in their last words (so a cut text loses it)."""
    import pandas as pd

    rng = np.random.default_rng(seed)
    texts, labels = [], []
    for _ in range(n):
        label = str(rng.choice(["pos", "neg"]))
        body = " ".join(rng.choice(WORDS[:6], size=int(rng.integers(20, 150))))
        texts.append(f"{body} verdict {'brilliant' if label == 'pos' else 'awful'}")
        labels.append(label)
    pd.DataFrame({"text": texts, "label": labels}).to_csv(path, index=False)  # as pandas writes it
    return texts


@pytest.mark.journey
def test_chunks_train_resume_evaluate_predict_count_texts(tmp_path, tiny_model_dir):
    train, val = tmp_path / "train.csv", tmp_path / "val.csv"
    _long_csv(train, 96, 0)
    val_texts = _long_csv(val, 21, 1)
    run = tmp_path / "run"
    args = ["train", "--config", ROOT / "configs" / "tiny.yaml", "--no-progress", f"model.name={tiny_model_dir}",
            "data.task=null", f"data.train_file={train}", f"data.validation_file={val}", "data.max_length=32",
            "data.buckets=[16, 32]", "data.long_text=chunks", "data.stride=8", f"data.cache_dir={tmp_path / 'c'}",
            f"train.output_dir={run}", "train.eval_every=4", "checkpoint.every_steps=4"]
    first = ok(flaxclf(*args, "train.max_steps=4"))
    assert "validation: 21 of 21 texts (100.0%) are longer than data.max_length 32 tokens" in first.stdout
    assert "data.long_text=chunks reads them whole as" in first.stdout
    again = ok(flaxclf(*args, "train.max_steps=8"))
    assert f"resumed from {run / 'checkpoints' / '4'} at step 4 of 8" in again.stdout
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"].startswith("validation")]
    assert [r["step"] for r in evals] == [4, 4, 8, 8] and all(r["count"] == 21 for r in evals)

    out = ok(flaxclf("evaluate", run, "--data", val, "--json", "-", "--no-progress"))
    result = json.loads(out.stdout)
    assert result["count"] == 21 and sum(sum(row) for row in result["confusion_matrix"]) == 21
    final = [r for r in evals if r["split"] == "validation_final"][0]
    assert result["accuracy"] == pytest.approx(final["accuracy"], abs=1e-12)

    pred = ok(flaxclf("predict", run, val, "--input-format", "csv", "--format", "jsonl", "--no-progress"))
    rows = [json.loads(x) for x in pred.stdout.splitlines()]
    assert [r["text"] for r in rows] == val_texts
    names = ["neg", "pos"]
    acc = np.mean([r["label"] == ("pos" if t.endswith("brilliant") else "neg") for r, t in zip(rows, val_texts,
                                                                                             strict=True)])
    assert acc == pytest.approx(result["accuracy"], abs=1e-12)
    assert all(set(r["probs"]) == set(names) for r in rows)

    # The same checkpoint read with truncation: one row per text too, and (almost surely) other numbers.
    trunc = json.loads(ok(flaxclf("evaluate", run, "--data", val, "--json", "-", "--long-text", "truncate",
                                    "--no-progress")).stdout)
    assert trunc["count"] == 21

    # Rerun in the same directory with the texts read another way: refused by name, nothing touched.
    before = tree_hash(run)
    refused(flaxclf(*[a for a in args if a != "data.long_text=chunks"], "train.max_steps=10"), "train",
             "data.long_text: chunks -> truncate", "checkpoint.fresh=true")
    assert tree_hash(run) == before


def test_short_texts_predict_the_same_under_chunks_and_truncate(tmp_path, tiny_model_dir):
    from flaxclf.inference import predict

    texts = _texts(30, 3, 1, 20)
    out = {}
    for mode in ("truncate", "chunks", "head_tail"):
        loaded = predict.load(str(tiny_model_dir), num_labels=3, max_length=32)
        loaded.read_long_text(mode, 8, None, "max_prob")
        out[mode] = predict.logits(loaded, predict.tokenize(loaded, texts, None))
    np.testing.assert_array_equal(out["chunks"].argmax(-1), out["truncate"].argmax(-1))
    # One window per text: the same rows, maybe batched otherwise, so float32's bound (tests/helpers.py) of the
    # session's tiny BERT (2 layers of six matmuls in sequence, the pooler, the classifier; <= 64 terms) at the
    # logits' magnitude, then the probability of the log of a probability (softmax, log, softmax over 3 classes).
    diff = np.abs(predict.probabilities(SINGLE, out["chunks"]) - predict.probabilities(SINGLE, out["truncate"]))
    bound = f32_bound(6 * 2 + 2, 64, float(np.abs(out["truncate"]).max())) + f32_bound(3, 3, 1.0)
    print(f"\nchunks vs truncate: probabilities max abs diff {diff.max():.2g} (bound {bound:.2g})")
    assert diff.max() <= bound
    np.testing.assert_array_equal(out["head_tail"], out["truncate"])


def test_long_text_settings_that_cannot_work_are_refused_in_one_line(tmp_path, tiny_model_dir):
    train = tmp_path / "train.csv"
    _long_csv(train, 40, 0)
    base = ["train", "--config", ROOT / "configs" / "tiny.yaml", f"model.name={tiny_model_dir}", "data.task=null",
            f"data.train_file={train}", f"train.output_dir={tmp_path / 'run'}", "data.max_length=16"]
    refused(flaxclf(*base, "data.long_text=chunks", "data.stride=20"), "train",
             "data.stride 20 leaves no new tokens", "use data.stride < 14")
    refused(flaxclf(*base, "data.long_text=chunks", "data.text_pair_column=text"), "train",
             "data.long_text=chunks works on single texts")
    assert not (tmp_path / "run").exists()
    refused(flaxclf("predict", tiny_model_dir, train, "--input-format", "csv", "--long-text", "chunks",
                      "--stride", "-1"), "predict", "--stride: -1 is not a count of tokens (>= 0)")
