"""Evaluation metrics in numpy, from predictions collected over a whole evaluation set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from flaxclf.options import MULTI, PROBLEM_TYPES, REGRESSION, SINGLE

# The numbers each problem type's evaluation reports (what train.best_metric may name).
SCALARS = {SINGLE: ("accuracy", "macro_f1"), MULTI: ("micro_f1", "macro_f1", "exact_match"),
           REGRESSION: ("mse", "pearson", "spearman")}


def _div(a: np.ndarray | float, b: np.ndarray | float) -> np.ndarray:
    """a / b with 0 where b == 0 (sklearn's zero_division=0)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.divide(a, b, out=np.zeros(np.broadcast_shapes(a.shape, b.shape)), where=b != 0)


def _keep(weight: np.ndarray | None, n: int) -> np.ndarray:
    """Rows to score: weight > 0 (weight 0 marks padding); all rows when weight is None."""
    keep = np.ones(n, bool) if weight is None else np.asarray(weight).reshape(-1) > 0
    if keep.shape[0] != n:
        raise ValueError(f"weight has {keep.shape[0]} rows but the predictions have {n}")
    if not keep.any():
        raise ValueError("there are no rows to evaluate (every weight is 0); the evaluation set is empty")
    return keep


def _prf(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class precision, recall and F1, each 0 where undefined."""
    precision, recall = _div(tp, tp + fp), _div(tp, tp + fn)
    return precision, recall, _div(2 * precision * recall, precision + recall)


def _per_class(label_names: Sequence[str], p: np.ndarray, r: np.ndarray, f: np.ndarray,
               support: np.ndarray) -> dict[str, dict[str, float]]:
    return {str(name): {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
                        "support": int(support[i])} for i, name in enumerate(label_names)}


def _check_names(label_names: Sequence[str], num_classes: int) -> None:
    if len(label_names) != num_classes:
        raise ValueError(f"got {len(label_names)} label names for {num_classes} logit columns")


def classification_metrics(logits: np.ndarray, labels: np.ndarray, weight: np.ndarray | None,
                           label_names: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro F1, per-class precision/recall/F1 and the confusion matrix (rows = true) of argmax."""
    logits = np.asarray(logits)
    c = logits.shape[1]
    _check_names(label_names, c)
    keep = _keep(weight, logits.shape[0])
    y, pred = np.asarray(labels).reshape(-1)[keep].astype(np.int64), logits[keep].argmax(-1)
    if y.min() < 0 or y.max() >= c:
        raise ValueError(f"labels must lie in [0, {c}) for {c} classes; found {y.min()}..{y.max()}")
    cm = np.zeros((c, c), np.int64)
    np.add.at(cm, (y, pred), 1)
    tp = np.diag(cm)
    p, r, f = _prf(tp, cm.sum(0) - tp, cm.sum(1) - tp)
    # Like sklearn's f1_score(average="macro"), average over classes seen in the labels or predictions.
    seen = (cm.sum(0) + cm.sum(1)) > 0
    return {"accuracy": float(tp.sum() / y.size), "macro_f1": float(f[seen].mean()),
            "per_class": _per_class(label_names, p, r, f, cm.sum(1)),
            "confusion_matrix": cm.tolist(), "count": int(y.size)}


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * x))  # tanh form does not overflow for large |x|


def multilabel_metrics(logits: np.ndarray, labels: np.ndarray, weight: np.ndarray | None,
                       label_names: Sequence[str], threshold: float = 0.5) -> dict[str, Any]:
    """Micro and macro F1, exact-match accuracy and per-class scores of sigmoid(logits) > threshold."""
    logits = np.asarray(logits, np.float64)
    _check_names(label_names, logits.shape[1])
    keep = _keep(weight, logits.shape[0])
    y, pred = np.asarray(labels)[keep] > 0.5, _sigmoid(logits[keep]) > threshold
    if y.shape != pred.shape:
        raise ValueError(f"multi-label labels have shape {y.shape} but the logits have {pred.shape}")
    tp, fp, fn = (y & pred).sum(0), (~y & pred).sum(0), (y & ~pred).sum(0)
    p, r, f = _prf(tp, fp, fn)
    micro = _div(2 * tp.sum(), 2 * tp.sum() + fp.sum() + fn.sum())
    return {"micro_f1": float(micro), "macro_f1": float(f.mean()),
            "exact_match": float((y == pred).all(1).mean()),
            "per_class": _per_class(label_names, p, r, f, y.sum(0)), "count": int(y.shape[0])}


def _rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (scipy.stats.rankdata's "average")."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], x.size]
    ranks = np.empty(x.size)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; nan when either side is constant."""
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float(np.clip((a * b).sum() / denom, -1.0, 1.0)) if denom > 0 else float("nan")


def regression_metrics(preds: np.ndarray, labels: np.ndarray, weight: np.ndarray | None) -> dict[str, Any]:
    """Mean squared error, Pearson and Spearman correlation (average ranks for ties)."""
    preds = np.asarray(preds, np.float64).reshape(np.shape(preds)[0], -1)
    if preds.shape[1] != 1:
        raise ValueError(f"regression expects one output per row; the predictions have shape {preds.shape}")
    keep = _keep(weight, preds.shape[0])
    x, y = preds[keep, 0], np.asarray(labels, np.float64).reshape(-1)[keep]
    return {"mse": float(((x - y) ** 2).mean()), "pearson": _pearson(x, y),
            "spearman": _pearson(_rank(x), _rank(y)), "count": int(x.size)}


def compute_metrics(problem_type: str, logits: np.ndarray, labels: np.ndarray, weight: np.ndarray | None,
                    label_names: Sequence[str]) -> dict[str, Any]:
    """The metrics of `problem_type` (the model.problem_type names)."""
    if problem_type == SINGLE:
        return classification_metrics(logits, labels, weight, label_names)
    if problem_type == MULTI:
        return multilabel_metrics(logits, labels, weight, label_names)
    if problem_type == REGRESSION:
        return regression_metrics(logits, labels, weight)
    raise ValueError(f"unknown problem type {problem_type!r}; use one of {', '.join(PROBLEM_TYPES)}")


def learns_nothing(result: dict[str, Any], label_names: Sequence[str], share: float = 0.95) -> str | None:
    """One line when a single-label evaluation shows a model that has not learned the task: one class predicted
    for at least `share` of the rows, or a macro-F1 no better than always predicting the most frequent class."""
    if "confusion_matrix" not in result:
        return None
    cm = np.asarray(result["confusion_matrix"])
    n, pred, true = cm.sum(), cm.sum(0), cm.sum(1)
    top, major = int(pred.argmax()), int(true.argmax())
    # Always predicting the majority class: F1 2m / (n + m) on it, 0 on every other class seen in the labels.
    baseline = 2 * true[major] / (n + true[major]) / max(int((true > 0).sum()), 1)
    if pred[top] < share * n and result["macro_f1"] > baseline + 1e-12:
        return None
    counts = ", ".join(f"{name} {int(c)}" for name, c in zip(label_names, pred, strict=True))
    truth = ", ".join(f"{name} {int(c)}" for name, c in zip(label_names, true, strict=True))
    return (f"the model learned little: it predicts {label_names[top]} for {pred[top] / n:.0%} of {n} rows "
            f"(predicted: {counts}; true: {truth}), macro-F1 {result['macro_f1']:.4f} against {baseline:.4f} for "
            f"always {label_names[major]}; try loss.class_weights=balanced, more train.epochs, or a higher "
            "optim.learning_rate")


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """The top-level numbers of a metrics dict, e.g. for TensorBoard or best-model selection."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "count"}


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Aligned text rows: the first column left-aligned (names), the others right-aligned (numbers)."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]

    def line(row: Sequence[str]) -> str:
        cells = [str(x).rjust(w) for x, w in zip(row, widths, strict=True)]
        return "  ".join([str(row[0]).ljust(widths[0]), *cells[1:]])

    return [line(row) for row in [header, *rows]]


def format_table(metrics: dict[str, Any]) -> str:
    """A human-readable table: the scalar metrics, then per-class scores and the confusion matrix if present."""
    lines = _table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in scalars(metrics).items()])
    if "count" in metrics:
        lines.append(f"({metrics['count']} examples)")
    per_class = metrics.get("per_class", {})
    if per_class:
        cols = ["precision", "recall", "f1", "support"]
        rows = [[name] + [f"{s[c]:.4f}" if c != "support" else str(s[c]) for c in cols]
                for name, s in per_class.items()]
        lines += [""] + _table(["label", *cols], rows)
    if "confusion_matrix" in metrics:
        names = list(per_class)
        rows = [[name] + [str(n) for n in row] for name, row in zip(names, metrics["confusion_matrix"], strict=True)]
        lines += ["", "confusion matrix (rows = true, columns = predicted)"] + _table(["", *names], rows)
    return "\n".join(lines)
