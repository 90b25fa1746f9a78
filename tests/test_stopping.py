"""Early stopping (train.early_stopping_patience / _min_delta): the step a hand computation predicts on a scripted
metric sequence, and a kill -9 during patience that resumes to the same stopping step and params."""

import json
from pathlib import Path

import pytest

from flaxclf.training import stopping

ROOT = Path(__file__).resolve().parents[1]

# Validation accuracy at evaluations 1, 2, ...; with min_delta 0.01 and patience 3, by hand (the reference is
# the best value so far, as the HF Trainer's best_metric; an evaluation improves when it beats it by > 0.01):
#   0.50 first (bad 0) | 0.60 +0.10 (0) | 0.605 +0.005 (1) | 0.59 (2) | 0.62 +0.015 over 0.605 (0) | 0.625 (1)
#   | 0.61 (2) | 0.60 (3: stop at evaluation 8)
SCRIPT = [0.50, 0.60, 0.605, 0.59, 0.62, 0.625, 0.61, 0.60, 0.9, 0.9]
HAND_BAD = [0, 0, 1, 2, 0, 1, 2, 3]


def _replay(values, lower_is_better=False, min_delta=0.01, patience=3):
    state, best, bad = stopping.initial(), None, []
    for i, v in enumerate(values):
        state = stopping.update(state, v, best, lower_is_better=lower_is_better, min_delta=min_delta,
                                patience=patience)
        bad.append(state["bad_evals"])
        if best is None or (v <= best if lower_is_better else v >= best):
            best = v
        if state["stopped"]:
            return i + 1, bad
    return None, bad


def test_the_scripted_sequence_stops_where_the_hand_computation_says():
    assert _replay(SCRIPT) == (8, HAND_BAD)
    assert _replay(SCRIPT, patience=4) == (None, HAND_BAD + [0, 1])
    assert _replay(SCRIPT, patience=None)[0] is None
    assert _replay([-v for v in SCRIPT], lower_is_better=True) == (8, HAND_BAD)  # e.g. mse: lower is better
    assert _replay([0.5, 0.5, 0.5], min_delta=0.0, patience=2) == (3, [0, 1, 2])  # a tie is no improvement


def test_a_run_stops_at_the_predicted_step_and_exports_its_best(tmp_path, tiny_model_dir, monkeypatch):
    from flaxclf.config import load_config
    from flaxclf.training import loop as train

    calls = []

    def scripted(job, params, split):
        value = 0.0  # what the end-of-run evaluations see
        if split == "validation" and not job.early["stopped"]:
            calls.append(int(job.state.step))
            value = SCRIPT[len(calls) - 1] if len(calls) <= len(SCRIPT) else 0.9
        return {"accuracy": value, "macro_f1": value, "count": 1}

    monkeypatch.setattr(train, "evaluate", scripted)
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [
        f"model.name={tiny_model_dir}", "data.max_length=32", "data.buckets=[32]",
        f"train.output_dir={tmp_path / 'run'}", "train.max_steps=40",
        "train.eval_every=2", "train.early_stopping_patience=3", "train.early_stopping_min_delta=0.01",
        "checkpoint.every_steps=0"])
    summary = train.run(cfg, show_progress=False)
    assert calls == [2, 4, 6, 8, 10, 12, 14, 16]  # evaluation 8, at step 16, is the last
    assert summary["steps"] == 16 and summary["early_stopped"] is True
    assert summary["best"] == {"value": 0.625, "step": 12} and summary["exported"] == "best (step 12)"
    steps = [r["step"] for r in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
             if r["split"] == "train"]
    assert max(steps) == 16
    assert (tmp_path / "run" / "export" / "model.safetensors").is_file()


@pytest.mark.journey
def test_kill_9_during_patience_resumes_to_the_same_stopping_step_and_params(tmp_path, tiny_model_dir):
    from tests.helpers import flaxclf, kill_9_after, ok, records, same_weights, train_args

    # min_delta 1.0: no evaluation after the first can improve on accuracy, so with evaluations every 4 steps and
    # patience 3 the run stops at the 4th evaluation, step 16, of 40 (by hand).
    extra = ("train.max_steps=40", "train.eval_every=4", "train.log_every=1", "checkpoint.every_steps=2",
             "train.early_stopping_patience=3", "train.early_stopping_min_delta=1.0")
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    out = ok(flaxclf(*train_args(tiny_model_dir, whole, *extra)))
    assert "early stopping at step 16" in out.stdout
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["early_stopped"] is True

    kill_9_after(tiny_model_dir, killed, 10, *extra)  # between evaluations 2 and 3: bad_evals is 1
    again = ok(flaxclf(*train_args(tiny_model_dir, killed, *extra)))
    assert "resumed from" in again.stdout and "early stopping at step 16" in again.stdout
    assert json.loads((killed / "summary.json").read_text())["steps"] == 16
    same_weights(whole / "export", killed / "export")
    assert max(r["step"] for r in records(killed) if r["split"] == "train") == 16

    # The stopped run, run again: nothing more is trained.
    before = len(records(whole))
    third = ok(flaxclf(*train_args(tiny_model_dir, whole, *extra)))
    assert "stopped early at step 16" in third.stdout and "nothing left to train" in third.stdout
    assert all(r["split"] != "train" for r in records(whole)[before:])
    assert json.loads((whole / "summary.json").read_text())["steps"] == 16
