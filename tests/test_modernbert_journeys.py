"""ModernBERT through the real `flaxclf` command, as a user takes it: a masked-LM checkpoint (model.* and head.*)
fine-tuned with either pooling, killed and resumed, exported to what transformers' AutoModel loads, predicted,
evaluated and inspected; long inputs up to the checkpoint's 512 positions; and what is refused."""

import csv
import io
import json

import numpy as np
import pytest

from tests.test_journeys import _ok, _records, _refused, _same_weights, _train_args, flaxclf, kill_9_after

pytestmark = pytest.mark.slow
TEXTS = ["a great film", "awful, just awful", "not bad at all " * 20]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_modernbert_dir) -> dict:
    """One run per pooling (6 steps, a checkpoint every 2, evaluated every 3)."""
    root = tmp_path_factory.mktemp("modernbert")
    out = {}
    for pooling in ("cls", "mean"):
        out[pooling] = root / pooling
        out[f"{pooling}_stdout"] = _ok(flaxclf(*_train_args(
            tiny_modernbert_dir, out[pooling], "train.max_steps=6", "train.eval_every=3", "checkpoint.every_steps=2",
            f"model.pooling={pooling}"))).stdout
    return out


def _predicted(run_dir) -> list[list[float]]:
    p = _ok(flaxclf("predict", str(run_dir), stdin="\n".join(TEXTS) + "\n"))
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    names = [k for k in rows[0] if k.startswith("prob_")]
    return [[float(r[n]) for n in names] for r in rows]


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fine_tune_then_pytorch_loads_the_export_with_the_same_predictions(runs, pooling):
    """The export is a ModernBertForSequenceClassification folder whose classifier_pooling is the run's, and
    transformers' PyTorch model gives the probabilities `flaxclf predict` gives."""
    torch = pytest.importorskip("torch")
    import transformers

    run_dir = runs[pooling]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert [r["step"] for r in _records(run_dir) if r["split"] == "validation"] == [3, 6]
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(run_dir / "export"), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "ModernBertForSequenceClassification"
    assert model.config.classifier_pooling == pooling
    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "export"))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits,
                              -1).numpy()
    np.testing.assert_allclose(_predicted(run_dir), probs, rtol=0, atol=1e-5)


def test_inspect_answers_the_seed_question_per_pooling(runs):
    """cls: position 0 alone reaches the logits; mean: every real token does and no padding."""
    out = {}
    for pooling in ("cls", "mean"):
        p = _ok(flaxclf("inspect", str(runs[pooling]), "--text", "not bad at all", "--pad-to", "10", "--json", "-"))
        out[pooling] = json.loads(p.stdout)
    cls_changes = [q["logit_change"] for q in out["cls"]["positions"]]
    assert out["cls"]["verdict"].startswith("Yes") and cls_changes[0] > 0 and not any(cls_changes[1:])
    assert out["mean"]["verdict"].startswith("No")
    for q in out["mean"]["positions"]:
        assert (q["logit_change"] > 0) == (not q["pad"]), q
    table = _ok(flaxclf("inspect", str(runs["mean"]), "--text", "not bad at all")).stdout
    assert "backbone: modernbert, 4 layers" in table and "2 global layers (every 2" in table
    assert "masked mean over every non-pad position" in table and "head: norm(gelu(dense 32 -> 32))" in table


def test_evaluate_and_export_agree_with_the_run(runs, tmp_path):
    run_dir = runs["cls"]
    p = _ok(flaxclf("evaluate", str(run_dir), "--split", "test", "--json", "-"))
    assert json.loads(p.stdout)["accuracy"] == pytest.approx(
        json.loads((run_dir / "summary.json").read_text())["test"]["accuracy"], abs=1e-6)
    _ok(flaxclf("export", str(run_dir), str(tmp_path / "again")))
    _same_weights(run_dir / "export", tmp_path / "again")


def test_kill_9_then_the_same_command_finishes_as_an_uninterrupted_run(tmp_path, tiny_modernbert_dir):
    extra = ("train.max_steps=12", "train.eval_every=6", "train.log_every=1", "checkpoint.every_steps=2")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    _ok(flaxclf(*_train_args(tiny_modernbert_dir, whole, *extra)))
    kill_9_after(tiny_modernbert_dir, killed, 5, *extra)
    again = _ok(flaxclf(*_train_args(tiny_modernbert_dir, killed, *extra)))
    assert "resumed from" in again.stdout + again.stderr
    _same_weights(whole / "export", killed / "export")
    assert [r["step"] for r in _records(killed) if r["split"] == "train"] == list(range(1, 13))


def test_inputs_up_to_the_checkpoints_positions_and_not_beyond(tmp_path, tiny_modernbert_dir):
    """data.max_length 512 (the checkpoint's max_position_embeddings) trains and predicts; 513 is refused in one
    line; texts longer than that still read whole with data.long_text=chunks."""
    long_args = ("data.max_length=512", "data.buckets=[64,512]", "train.max_steps=2", "train.eval_every=2")
    run_dir = tmp_path / "long"
    _ok(flaxclf(*_train_args(tiny_modernbert_dir, run_dir, *long_args)))
    p = _ok(flaxclf("predict", str(run_dir), stdin="a long film " * 300 + "\n"))
    assert len(list(csv.DictReader(io.StringIO(p.stdout)))) == 1
    _refused(flaxclf(*_train_args(tiny_modernbert_dir, tmp_path / "over", "data.max_length=513",
                                  "data.buckets=[64,513]")),
             "train", "data.max_length 513", "512")
    chunked = tmp_path / "chunks"
    _ok(flaxclf(*_train_args(tiny_modernbert_dir, chunked, "data.long_text=chunks", "data.stride=8",
                             "train.max_steps=2", "train.eval_every=2")))
    assert json.loads((chunked / "summary.json").read_text())["steps"] == 2


def test_remat_trains_long_inputs_as_the_run_without_it(tmp_path, tiny_modernbert_dir):
    """model.remat=true (layer 0, then layers 1 and 2 as a checkpointed scan, then layer 3) at the checkpoint's
    512 positions: the same losses step by step as the run without remat, the same test accuracy, and an export
    that predicts the same probabilities; the run resumes after a kill -9 as an uninterrupted one, and a run
    killed without remat resumes with it."""
    extra = ("data.max_length=512", "data.buckets=[64,512]", "train.max_steps=6", "train.eval_every=3",
             "train.log_every=1", "checkpoint.every_steps=2")
    plain, remat, killed = tmp_path / "plain", tmp_path / "remat", tmp_path / "killed"
    _ok(flaxclf(*_train_args(tiny_modernbert_dir, plain, *extra)))
    _ok(flaxclf(*_train_args(tiny_modernbert_dir, remat, *extra, "model.remat=true")))
    losses = [[r["loss"] for r in _records(d) if r["split"] == "train"] for d in (plain, remat)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (plain, remat)]
    assert summaries[1]["test"]["accuracy"] == summaries[0]["test"]["accuracy"]
    np.testing.assert_allclose(_predicted(remat), _predicted(plain), rtol=0, atol=1e-5)
    # Killed after step 5: step 4's save may be cut short, step 2's is complete (orbax waits for the previous save
    # before it starts the next), so the command resumes rather than starting over.
    kill_9_after(tiny_modernbert_dir, killed, 5, *extra, "model.remat=true")
    again = _ok(flaxclf(*_train_args(tiny_modernbert_dir, killed, *extra, "model.remat=true")))
    assert "resumed from" in again.stdout
    _same_weights(remat / "export", killed / "export")
    # remat changes how a step computes, not what it holds: a run killed without it resumes with it
    toggled = tmp_path / "toggled"
    kill_9_after(tiny_modernbert_dir, toggled, 5, *extra)
    resumed = _ok(flaxclf(*_train_args(tiny_modernbert_dir, toggled, *extra, "model.remat=true")))
    assert "resumed from" in resumed.stdout
    np.testing.assert_allclose(_predicted(toggled), _predicted(plain), rtol=0, atol=1e-5)


def test_settings_modernbert_does_not_have_are_refused(tmp_path, tiny_modernbert_dir):
    _refused(flaxclf(*_train_args(tiny_modernbert_dir, tmp_path / "max", "model.pooling=max")),
             "train", "pooling 'max' is not one of ModernBERT's")
    _refused(flaxclf(*_train_args(tiny_modernbert_dir, tmp_path / "hf", "model.impl=hf")), "train", "impl")
