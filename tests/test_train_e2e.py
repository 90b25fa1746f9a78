"""The whole job end to end on the tiny model (tests/conftest.py) and the packaged rt-snippets-4way task, on the
8 fake devices: what a run writes, the HF export, and a NaN loss stopping the run with the step named."""

import json
from pathlib import Path

import pytest

from flaxclf.config import load_config
from flaxclf.data import load_task
from flaxclf.training.loop import TrainingError, run
from flaxclf.training.metrics_log import read_records
from tests.torch_ref import needs_torch

pytestmark = pytest.mark.journey

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
# One bucket (64): one compiled train step and one eval step; 8 steps, eval every 4, a line every 2.
SHORT = ["data.max_length=64", "data.buckets=[64]", "train.max_steps=8", "train.eval_every=4", "train.log_every=2",
         "checkpoint.every_steps=4"]


def _cfg(model_dir, out_dir, *extra: str):
    return load_config(TINY, [f"model.name={model_dir}", f"train.output_dir={out_dir}", *SHORT,
                                             *extra])


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    summary = run(_cfg(tiny_model_dir, out), show_progress=False)
    return out, summary, read_records(out)


def test_metrics_has_each_log_step_once_and_validation(finished_run, tiny_model_dir):
    out, _, records = finished_run
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == [2, 4, 6, 8]  # each log_every step exactly once, in order
    for r in records:
        if r["split"] == "train":
            assert r["loss"] > 0 and r["lr"] >= 0 and r["examples_per_s"] > 0
    validation = [r for r in records if r["split"] == "validation"]
    assert [r["step"] for r in validation] == [4, 8]
    # Every validation row exactly once, whatever padding the last eval batch needed on 8 devices.
    _, splits = load_task(load_config(out / "config.yaml").data, tiny_model_dir)
    for r in validation:
        assert r["count"] == len(splits["validation"]) == sum(map(sum, r["confusion_matrix"]))
        assert 0.0 <= r["accuracy"] <= 1.0


def test_summary_has_validation_and_test_accuracy(finished_run):
    out, summary, _ = finished_run
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == summary["steps"] == 8
    for split in ("validation", "test"):
        assert 0.0 <= on_disk[split]["accuracy"] <= 1.0
    assert (out / "config.yaml").is_file() and (out / "labels.json").is_file()


@pytest.mark.hf
def test_export_loads_in_pytorch_with_no_missing_keys(finished_run):
    needs_torch()
    import transformers

    out, summary, _ = finished_run
    assert summary["export_dir"] == str(out / "export")
    model, info = transformers.BertForSequenceClassification.from_pretrained(out / "export",
                                                                             output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]  # lists or sets
    assert model.config.num_labels == 4
    labels = json.loads((out / "labels.json").read_text())["id2label"]
    assert {str(k): v for k, v in model.config.id2label.items()} == labels


def test_nan_loss_stops_with_the_step_named(tiny_model_dir, tmp_path):
    # warmup 0: step 1 takes the full 1e30 rate, so step 2's forward pass overflows.
    cfg = _cfg(tiny_model_dir, tmp_path, "optim.learning_rate=1e30", "optim.warmup_ratio=0", "train.max_steps=4",
               "train.eval_every=100")
    with pytest.raises(TrainingError, match=r"the training loss is (nan|inf|-inf) at step 2;") as e:
        run(cfg, show_progress=False)
    assert "optim.learning_rate" in str(e.value)
    assert not (tmp_path / "summary.json").exists()
    assert all(r["step"] < 2 for r in read_records(tmp_path))  # nothing logged for the step that diverged
