"""Metrics against hand-computed cases and scipy."""

import numpy as np
import pytest
from scipy import stats

from flaxclf.training.metrics import (
    classification_metrics,
    compute_metrics,
    format_table,
    multilabel_metrics,
    regression_metrics,
    scalars,
)

NAMES = ["neg", "neu", "pos"]


def _one_hot_logits(pred: list[int], c: int = 3) -> np.ndarray:
    return np.eye(c)[pred] * 5.0 - 1.0


def test_classification_hand_computed():
    y = [0, 0, 0, 1, 1, 2, 2, 2]
    pred = [0, 0, 1, 1, 2, 2, 2, 0]
    m = classification_metrics(_one_hot_logits(pred), np.array(y), None, NAMES)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 2]]
    assert m["accuracy"] == pytest.approx(5 / 8)
    # neg: p 2/3 r 2/3; neu: p 1/2 r 1/2; pos: p 2/3 r 2/3.
    assert m["per_class"]["neg"] == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "support": 3})
    assert m["per_class"]["neu"]["f1"] == pytest.approx(0.5)
    assert m["per_class"]["pos"]["support"] == 3
    assert m["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 2 / 3) / 3)
    assert m["count"] == 8


def test_classification_zero_division_and_unseen_class():
    # Class "neu" is never true nor predicted: left out of macro F1 (as sklearn does), scored 0 per class.
    # Class "pos" is predicted but never true: precision 0, recall 0/0 -> 0, F1 0.
    y, pred = [0, 0, 0, 0], [0, 0, 0, 2]
    m = classification_metrics(_one_hot_logits(pred), np.array(y), None, NAMES)
    assert m["per_class"]["neu"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert m["per_class"]["pos"]["f1"] == 0.0
    f1_neg = 2 * 1.0 * 0.75 / 1.75
    assert m["macro_f1"] == pytest.approx((f1_neg + 0.0) / 2)


def test_padding_rows_change_nothing():
    rng = np.random.default_rng(0)
    logits, y = rng.normal(size=(20, 3)), rng.integers(0, 3, 20)
    base = classification_metrics(logits, y, np.ones(20), NAMES)
    padded = classification_metrics(np.concatenate([logits, rng.normal(size=(5, 3))]),
                                    np.concatenate([y, np.zeros(5, int)]),
                                    np.r_[np.ones(20), np.zeros(5)], NAMES)
    assert padded == base
    reg = regression_metrics(logits[:, 0], y.astype(float), None)
    reg_pad = regression_metrics(np.r_[logits[:, 0], 9.0, -9.0], np.r_[y, 0.0, 5.0], np.r_[np.ones(20), 0, 0])
    assert reg_pad == reg
    ml_y = (rng.random((20, 3)) > 0.5).astype(int)
    ml = multilabel_metrics(logits, ml_y, None, NAMES)
    ml_pad = multilabel_metrics(np.r_[logits, np.ones((2, 3))], np.r_[ml_y, np.zeros((2, 3), int)],
                                np.r_[np.ones(20), 0, 0], NAMES)
    assert ml_pad == ml


def test_multilabel_hand_computed():
    labels = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]])
    probs = np.array([[0.9, 0.2, 0.7], [0.1, 0.4, 0.3], [0.8, 0.6, 0.6], [0.2, 0.1, 0.1]])
    m = multilabel_metrics(np.log(probs / (1 - probs)), labels, None, NAMES)
    # Predictions [[1,0,1],[0,0,0],[1,1,1],[0,0,0]]: per class (tp, fp, fn) = (2,0,0), (1,0,1), (1,1,0).
    assert [m["per_class"][n]["f1"] for n in NAMES] == pytest.approx([1.0, 2 / 3, 2 / 3])
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))
    assert m["macro_f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["exact_match"] == pytest.approx(2 / 4)
    assert m["per_class"]["neu"]["support"] == 2


@pytest.mark.parametrize("seed", [0, 1])
def test_regression_matches_scipy(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 6, 50).astype(float)  # many ties, as in STS-B's 0..5 scores
    x = y + rng.normal(size=50)
    x[:10] = np.round(x[:10])  # ties in the predictions as well
    m = regression_metrics(x[:, None], y, np.ones(50))
    assert m["mse"] == pytest.approx(np.mean((x - y) ** 2))
    assert m["pearson"] == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-12)
    assert m["spearman"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)
    assert m["count"] == 50


def test_constant_predictions_give_nan_correlation():
    m = regression_metrics(np.ones(4), np.arange(4.0), None)
    assert np.isnan(m["pearson"]) and np.isnan(m["spearman"]) and m["mse"] == pytest.approx(1.5)


def test_compute_metrics_dispatch_and_errors():
    logits = _one_hot_logits([0, 1])
    assert "accuracy" in compute_metrics("single_label_classification", logits, np.array([0, 1]), None, NAMES)
    assert "micro_f1" in compute_metrics("multi_label_classification", logits, np.eye(3)[[0, 1]], None, NAMES)
    assert "mse" in compute_metrics("regression", logits[:, :1], np.array([0.0, 1.0]), None, ["score"])
    with pytest.raises(ValueError, match="unknown problem type 'ranking'"):
        compute_metrics("ranking", logits, np.array([0, 1]), None, NAMES)
    with pytest.raises(ValueError, match="no rows to evaluate"):
        classification_metrics(logits, np.array([0, 1]), np.zeros(2), NAMES)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        classification_metrics(logits, np.array([0, 3]), None, NAMES)


def test_format_table_and_scalars():
    m = classification_metrics(_one_hot_logits([0, 1, 2, 2]), np.array([0, 1, 2, 1]), None, NAMES)
    assert scalars(m) == {"accuracy": 0.75, "macro_f1": pytest.approx(m["macro_f1"])}
    text = format_table(m)
    assert "accuracy" in text and "0.7500" in text and "confusion matrix" in text
    assert any(line.split()[:1] == ["neu"] for line in text.splitlines())
    assert "mse" in format_table(regression_metrics(np.arange(3.0), np.arange(3.0), None))
