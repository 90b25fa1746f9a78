"""Imbalanced classes through the command: the learns-nothing warning (by hand, and firing on a 64/27/9 set),
balanced class weights reported at the start and saved with the run."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from flaxclf.training import metrics

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["neg", "pos", "mixed"]


def _result(cm) -> dict:
    cm = np.asarray(cm)
    return metrics.classification_metrics(np.eye(3)[np.repeat(np.tile([0, 1, 2], 3), cm.ravel())],
                                          np.repeat(np.repeat([0, 1, 2], 3), cm.ravel()), None, NAMES)


def test_learns_nothing_by_hand():
    # Always "pos" on 64/27/9: F1(pos) = 2*64/(100+64) = 0.7805, macro over the 3 classes seen = 0.2602.
    constant = _result([[0, 27, 0], [0, 64, 0], [0, 9, 0]])
    line = metrics.learns_nothing(constant, NAMES)
    assert line is not None and "\n" not in line
    assert "predicts pos for 100% of 100 rows" in line and "true: neg 27, pos 64, mixed 9" in line
    assert "macro-F1 0.2602 against 0.2602 for always pos" in line and "loss.class_weights=balanced" in line
    # 95% of the rows one class: warned even with a macro-F1 above the baseline.
    assert metrics.learns_nothing(_result([[1, 26, 0], [0, 64, 0], [0, 5, 4]]), NAMES) is not None
    # 93% one class and a macro-F1 above the baseline: a model that learned something.
    assert metrics.learns_nothing(_result([[2, 25, 0], [0, 64, 0], [0, 4, 5]]), NAMES) is None
    # Below 95% but no better than always predicting the majority.
    weak = _result([[0, 20, 7], [10, 50, 4], [2, 7, 0]])
    assert weak["macro_f1"] <= 0.2602 and metrics.learns_nothing(weak, NAMES) is not None
    assert metrics.learns_nothing({"micro_f1": 0.1, "macro_f1": 0.1}, NAMES) is None  # multi-label: not judged


def _imbalanced_csvs(folder: Path) -> dict[str, Path]:
    """64/27/9 rows of short texts whose words say the class (learnable, but not in 12 tiny steps)."""
    import pandas as pd

    rng = np.random.default_rng(0)
    words = {"pos": ["good", "great", "fine"], "neg": ["bad", "awful", "dull"], "mixed": ["but", "though", "yet"]}
    files = {}
    for split, n in (("train", 300), ("validation", 100), ("test", 100)):
        labels = rng.permutation(["pos"] * (64 * n // 100) + ["neg"] * (27 * n // 100) + ["mixed"] * (9 * n // 100))
        texts = [" ".join(rng.choice(words[y] + ["film", "plot", "the"], size=int(rng.integers(3, 12))))
                 for y in labels]
        files[split] = folder / f"{split}.csv"
        pd.DataFrame({"text": texts, "label": labels}).to_csv(files[split], index=False)
    return files


@pytest.mark.journey
def test_a_run_that_learns_nothing_says_so_and_balanced_weights_are_reported_and_saved(tmp_path, tiny_model_dir):
    from sklearn.utils.class_weight import compute_class_weight

    from tests.helpers import flaxclf, ok

    files = _imbalanced_csvs(tmp_path)
    base = ["train", "--config", ROOT / "configs" / "tiny.yaml", "--no-progress", f"model.name={tiny_model_dir}",
            "data.task=null", *(f"data.{s}_file={p}" for s, p in files.items()), "data.max_length=32",
            "data.buckets=[16, 32]"]
    plain = ok(flaxclf(*base, f"train.output_dir={tmp_path / 'none'}"))
    warned = [line.strip() for line in plain.stdout.splitlines() if line.strip().startswith("warning: test:")]
    assert len(warned) == 1 and re.search(r"the model learned little: it predicts \w+ for 100% of 100 rows", warned[0])
    summary = json.loads((tmp_path / "none" / "summary.json").read_text())
    assert any(w.startswith("test: the model learned little") for w in summary["warnings"])
    assert summary["test"]["macro_f1"] <= 2 * 64 / 164 / 3 + 1e-9  # no better than always "pos"

    balanced = ok(flaxclf(*base, f"train.output_dir={tmp_path / 'balanced'}", "loss.class_weights=balanced",
                           "loss.label_smoothing=0.1"))
    import pandas as pd

    y = pd.read_csv(files["train"])["label"].to_numpy()
    names = sorted(set(y))  # flaxclf orders string labels as sorted
    want = compute_class_weight("balanced", classes=np.array(names), y=y)
    saved = json.loads((tmp_path / "balanced" / "labels.json").read_text())
    assert list(saved["id2label"].values()) == names
    np.testing.assert_allclose(saved["loss"]["class_weights"], want, rtol=1e-12)
    assert saved["loss"]["label_smoothing"] == 0.1
    start = [line for line in balanced.stdout.splitlines() if "class weights" in line]
    assert len(start) == 1 and all(f"{w:.4f}" in start[0] for w in want), start
