"""Early stopping on train.best_metric: a pure update per evaluation, its state saved in every checkpoint so a
resumed run counts patience exactly as an uninterrupted one."""

from __future__ import annotations


def initial() -> dict:
    """The state before the first evaluation: no reference yet, no evaluation without improvement."""
    return {"bad_evals": 0, "stopped": False}


def improved(value: float, best: float | None, lower_is_better: bool, min_delta: float) -> bool:
    """Whether `value` beats the best so far by more than min_delta (the first evaluation always does)."""
    if best is None:
        return True
    gain = best - value if lower_is_better else value - best
    return gain > min_delta


def update(state: dict, value: float, best: float | None, *, lower_is_better: bool, min_delta: float,
           patience: int | None) -> dict:
    """The state after an evaluation scoring `value`, where `best` is the best value before it. The run stops
    once `patience` evaluations in a row have not improved; patience None never stops it."""
    bad = 0 if improved(value, best, lower_is_better, min_delta) else state["bad_evals"] + 1
    return {"bad_evals": bad, "stopped": patience is not None and bad >= patience}
