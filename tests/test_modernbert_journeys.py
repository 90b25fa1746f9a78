"""ModernBERT through the real `flaxclf` command, as a user takes it: a masked-LM checkpoint (model.* and head.*)
fine-tuned with either pooling, with and without remat, killed and resumed, exported to what transformers'
AutoModel loads, predicted, evaluated and inspected; long inputs up to the checkpoint's 512 positions; and what
is refused."""

import csv
import io
import json

import numpy as np
import pytest

from tests.helpers import flaxclf, kill_9_after, ok, records, refused, same_weights, train_args

pytestmark = pytest.mark.journey
TEXTS = ["a great film", "awful, just awful", "not bad at all " * 20]


# 6 steps, a checkpoint every 2, evaluated every 3; the cls runs at the checkpoint's 512 positions.
BASE = ("train.max_steps=6", "train.eval_every=3", "train.log_every=1", "checkpoint.every_steps=2")
LONG = ("data.max_length=512", "data.buckets=[64,512]")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_modernbert_dir) -> dict:
    """The runs the tests read: cls pooling at 512 tokens, the same with model.remat=true, and mean pooling at 32.
    Three runs at 512 tokens (a plain one, a long one, a remat one) became these two: one serves each."""
    root = tmp_path_factory.mktemp("modernbert")
    out = {}
    for name, extra in (("cls", LONG), ("remat", (*LONG, "model.remat=true")), ("mean", ("model.pooling=mean",))):
        out[name] = root / name
        out[f"{name}_args"] = (*BASE, *extra)
        out[f"{name}_stdout"] = ok(flaxclf(*train_args(tiny_modernbert_dir, out[name], *out[f"{name}_args"]))).stdout
    return out


def _predicted(run_dir) -> list[list[float]]:
    p = ok(flaxclf("predict", str(run_dir), stdin="\n".join(TEXTS) + "\n"))
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    names = [k for k in rows[0] if k.startswith("prob_")]
    return [[float(r[n]) for n in names] for r in rows]


@pytest.mark.hf
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_fine_tune_then_pytorch_loads_the_export_with_the_same_predictions(runs, pooling):
    """The export is a ModernBertForSequenceClassification folder whose classifier_pooling is the run's, and
    transformers' PyTorch model gives the probabilities `flaxclf predict` gives."""
    torch = pytest.importorskip("torch")
    import transformers

    run_dir = runs[pooling]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and 0.0 <= summary["test"]["accuracy"] <= 1.0
    assert [r["step"] for r in records(run_dir) if r["split"] == "validation"] == [3, 6]
    model, info = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(run_dir / "export"), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "ModernBertForSequenceClassification"
    assert model.config.classifier_pooling == pooling
    tok = transformers.AutoTokenizer.from_pretrained(str(run_dir / "export"))
    max_length = 512 if pooling == "cls" else 32  # the run's data.max_length, to which predict truncates
    enc = tok(TEXTS, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits,
                              -1).numpy()
    np.testing.assert_allclose(_predicted(run_dir), probs, rtol=0, atol=1e-5)


def test_inspect_answers_the_seed_question_per_pooling(runs):
    """cls: position 0 alone reaches the logits; mean: every real token does and no padding."""
    out = {}
    for pooling in ("cls", "mean"):
        p = ok(flaxclf("inspect", str(runs[pooling]), "--text", "not bad at all", "--pad-to", "10", "--json", "-"))
        out[pooling] = json.loads(p.stdout)
    cls_changes = [q["logit_change"] for q in out["cls"]["positions"]]
    assert out["cls"]["verdict"].startswith("Yes") and cls_changes[0] > 0 and not any(cls_changes[1:])
    assert out["mean"]["verdict"].startswith("No")
    for q in out["mean"]["positions"]:
        assert (q["logit_change"] > 0) == (not q["pad"]), q
    table = ok(flaxclf("inspect", str(runs["mean"]), "--text", "not bad at all")).stdout
    assert "backbone: modernbert, 4 layers" in table and "2 global layers (every 2" in table
    assert "masked mean over every non-pad position" in table and "head: norm(gelu(dense 32 -> 32))" in table


def test_evaluate_and_export_agree_with_the_run(runs, tmp_path):
    run_dir = runs["cls"]
    p = ok(flaxclf("evaluate", str(run_dir), "--split", "test", "--json", "-"))
    assert json.loads(p.stdout)["accuracy"] == pytest.approx(
        json.loads((run_dir / "summary.json").read_text())["test"]["accuracy"], abs=1e-6)
    ok(flaxclf("export", str(run_dir), str(tmp_path / "again")))
    same_weights(run_dir / "export", tmp_path / "again")


def test_inputs_up_to_the_checkpoints_positions_and_not_beyond(runs, tmp_path, tiny_modernbert_dir):
    """data.max_length 512 (the checkpoint's max_position_embeddings) trains (the cls run) and predicts; 513 is
    refused in one line; texts longer than that still read whole with data.long_text=chunks."""
    p = ok(flaxclf("predict", str(runs["cls"]), stdin="a long film " * 300 + "\n"))
    assert len(list(csv.DictReader(io.StringIO(p.stdout)))) == 1
    refused(flaxclf(*train_args(tiny_modernbert_dir, tmp_path / "over", "data.max_length=513",
                                "data.buckets=[64,513]")),
            "train", "data.max_length 513", "512")
    chunked = tmp_path / "chunks"
    ok(flaxclf(*train_args(tiny_modernbert_dir, chunked, "data.long_text=chunks", "data.stride=8",
                           "train.max_steps=2", "train.eval_every=2")))
    assert json.loads((chunked / "summary.json").read_text())["steps"] == 2


def test_remat_trains_long_inputs_as_the_run_without_it(runs, tmp_path, tiny_modernbert_dir):
    """model.remat=true (layer 0, then layers 1 and 2 as a checkpointed scan, then layer 3) at the checkpoint's
    512 positions: the same losses step by step as the run without remat, the same test accuracy, and an export
    that predicts the same probabilities; the run resumes after a kill -9 as an uninterrupted one (every step
    logged once), and a run killed without remat resumes with it. The module's slowest test: two killed runs and
    their resumes at 512 tokens, each a fresh process that compiles."""
    plain, remat, killed = runs["cls"], runs["remat"], tmp_path / "killed"
    losses = [[r["loss"] for r in records(d) if r["split"] == "train"] for d in (plain, remat)]
    assert len(losses[0]) == 6
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (plain, remat)]
    assert summaries[1]["test"]["accuracy"] == summaries[0]["test"]["accuracy"]
    np.testing.assert_allclose(_predicted(remat), _predicted(plain), rtol=0, atol=1e-5)
    # Killed after step 5: step 4's save may be cut short, step 2's is complete (orbax waits for the previous save
    # before it starts the next), so the command resumes rather than starting over.
    kill_9_after(tiny_modernbert_dir, killed, 5, *runs["remat_args"])
    again = ok(flaxclf(*train_args(tiny_modernbert_dir, killed, *runs["remat_args"])))
    assert "resumed from" in again.stdout
    same_weights(remat / "export", killed / "export")
    assert [r["step"] for r in records(killed) if r["split"] == "train"] == list(range(1, 7))
    # remat changes how a step computes, not what it holds: a run killed without it resumes with it
    toggled = tmp_path / "toggled"
    kill_9_after(tiny_modernbert_dir, toggled, 5, *runs["cls_args"])
    resumed = ok(flaxclf(*train_args(tiny_modernbert_dir, toggled, *runs["remat_args"])))
    assert "resumed from" in resumed.stdout
    np.testing.assert_allclose(_predicted(toggled), _predicted(plain), rtol=0, atol=1e-5)


def test_settings_modernbert_does_not_have_are_refused(tmp_path, tiny_modernbert_dir):
    refused(flaxclf(*train_args(tiny_modernbert_dir, tmp_path / "max", "model.pooling=max")),
             "train", "pooling 'max' is not one of ModernBERT's")
    refused(flaxclf(*train_args(tiny_modernbert_dir, tmp_path / "hf", "model.impl=hf")), "train", "impl")
