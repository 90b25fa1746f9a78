"""What a run writes for people: metrics.jsonl, TensorBoard events, a progress bar. Process 0 only."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import jax

METRICS_FILE = "metrics.jsonl"


def _scalars(record: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a metrics record, flattened to 'a/b' names (for TensorBoard)."""
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            out[f"{prefix}{k}"] = float(v)
    return out


def truncate_after(path: Path, step: int) -> None:
    """Drops records logged after `step` (a resumed run logs them again), so no step appears twice."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    os.replace(tmp, path)


def read_records(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.is_file() else []


class RunLog:
    """JSONL + TensorBoard + tqdm on process 0; a no-op elsewhere."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, show_progress: bool = True):
        self.active = jax.process_index() == 0
        self.path = run_dir / METRICS_FILE
        self.bar = self.tb = self._redirect = None
        self._bar_args = (total_steps, start_step) if show_progress and self.active else None
        if not self.active:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, start_step)
        SummaryWriter = _summary_writer_class()
        # purge_step hides events a previous attempt wrote after the checkpoint we resumed from.
        self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _open_bar(self) -> None:
        """The progress bar, from the first step on (what is said before training is plain lines), with the
        process's log records routed through it while it is drawn, so that no line lands on the bar's line."""
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        total, start = self._bar_args
        self._bar_args = None
        self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)
        self._redirect = logging_redirect_tqdm(tqdm_class=type(self.bar))
        self._redirect.__enter__()

    def write(self, record: dict) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        # Tags are namespaced by split ("validation/accuracy", "test_best/accuracy"): one curve, one split.
        for name, value in _scalars(record, f"{record['split']}/").items():
            if math.isfinite(value):
                self.tb.add_scalar(name, value, record["step"])
        self.tb.flush()

    def progress(self, step: int, **postfix: Any) -> None:
        if self._bar_args is not None:
            self._open_bar()
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()},
                                 refresh=False)
            self.bar.refresh()

    def say(self, text: str) -> None:
        if self.active:
            (self.bar.write if self.bar is not None else print)(text)

    def end_progress(self) -> None:
        """Draws the bar's final state once and puts the log handlers back: what follows is plain lines."""
        self._bar_args = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None

    def close(self) -> None:
        """Idempotent: a run that fails closes its log on the way out, after a preempted one already did."""
        self.end_progress()
        if self.tb is not None:
            self.tb.close()
            self.tb = None


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch whenever it is installed
    (for its graph and video helpers, which flaxclf does not use), and that costs a training run over a second of
    start-up and hundreds of MB. A None entry in sys.modules makes its `import torch` fail as if torch were absent;
    the entry is put back as it was."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter
