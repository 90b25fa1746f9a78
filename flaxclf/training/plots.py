"""Pictures of a run from its metrics.jsonl: training curves, evaluation curves, a confusion matrix (PNG).

Figures are drawn on matplotlib's Agg canvas directly (matplotlib.figure.Figure, no pyplot), so no display
is needed and the global backend is left alone. `python -m flaxclf.training.plots RUN_DIR` redraws them.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from flaxclf.training.metrics_log import read_records

PLOTS_DIR = "plots"
_TRAIN_KEYS = (("loss", "training loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm"))
_SKIP = ("step", "split", "epoch", "count", "per_class", "confusion_matrix")


def _figure(n_panels: int, height: float = 3.2):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * n_panels, height), layout="constrained")
    return fig, [fig.add_subplot(1, n_panels, i + 1) for i in range(n_panels)]


def training_curves(records: list[dict], path: Path) -> Path | None:
    """Loss, learning rate and gradient norm against the step."""
    train = [r for r in records if r.get("split") == "train"]
    keys = [(k, title) for k, title in _TRAIN_KEYS if any(k in r for r in train)]
    if not train or not keys:
        return None
    fig, axes = _figure(len(keys))
    for ax, (k, title) in zip(axes, keys, strict=True):
        pts = [(r["step"], r[k]) for r in train if k in r]
        ax.plot(*zip(*pts, strict=True), marker="." if len(pts) < 30 else None)
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def eval_curves(records: list[dict], path: Path) -> Path | None:
    """Every scalar validation metric against the step."""
    val = [r for r in records if r.get("split") == "validation"]
    names = [k for k in (val[0] if val else {}) if k not in _SKIP and isinstance(val[0][k], (int, float))]
    if not names:
        return None
    fig, axes = _figure(len(names))
    for ax, k in zip(axes, names, strict=True):
        pts = [(r["step"], r[k]) for r in val if isinstance(r.get(k), (int, float))]
        ax.plot(*zip(*pts, strict=True), marker="o")
        ax.set(title=f"validation {k}", xlabel="step")
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def _confusion_record(records: list[dict]) -> dict | None:
    """The final test evaluation, else the final validation one, else the last periodic validation."""
    with_cm = [r for r in records if "confusion_matrix" in r]
    for prefix in ("test_", "validation_", "validation"):
        found = [r for r in with_cm if r["split"].startswith(prefix)]
        if found:
            return found[-1]
    return None


def confusion_matrix(records: list[dict], path: Path) -> Path | None:
    """Counts (rows = true, columns = predicted), coloured by the share of each true class."""
    rec = _confusion_record(records)
    if rec is None:
        return None
    cm = np.asarray(rec["confusion_matrix"])
    names = list(rec.get("per_class", {})) or [str(i) for i in range(len(cm))]
    share = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = 2.0 + 0.7 * len(names)
    fig, (ax,) = _figure(1, height=size)
    fig.set_figwidth(size + 1.5)
    im = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title=f"{rec['split']} at step {rec['step']} ({int(cm.sum())} examples)")
    for (i, j), n in np.ndenumerate(cm):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the true class")
    fig.savefig(path, dpi=100)
    return path


def write_plots(run_dir: str | Path) -> list[Path]:
    """Draws every picture the run's metrics.jsonl supports into <run_dir>/plots/; returns their paths."""
    run_dir = Path(run_dir)
    records = read_records(run_dir)
    out = run_dir / PLOTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    drawn = [training_curves(records, out / "training.png"), eval_curves(records, out / "eval.png"),
             confusion_matrix(records, out / "confusion_matrix.png")]
    return [p for p in drawn if p is not None]


if __name__ == "__main__":
    for p in write_plots(sys.argv[1] if len(sys.argv) > 1 else "runs/default"):
        print(p)
