"""The run directory: what a run writes at its top, the rule that it never overwrites what it did not write,
and what a fresh start removes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import jax
import yaml

from flaxclf.config import ConfigError, RunConfig
from flaxclf.training.checkpoint import CHECKPOINTS, UNREADABLE_SUFFIX
from flaxclf.training.metrics_log import METRICS_FILE

# What a run writes at the top of its directory; the header marks config.yaml (and so the folder) as flaxclf's.
RUN_FILES = ("config.yaml", "labels.json", METRICS_FILE, "tb", CHECKPOINTS, CHECKPOINTS + UNREADABLE_SUFFIX,
             "export", "plots", "summary.json")
CONFIG_HEADER = "# flaxclf train: the resolved settings of this run directory\n"


def check_output_dir(run_dir: Path) -> None:
    """A run writes into a new folder, its own run directory, or a folder where none of its file names exist:
    it never overwrites a file it did not write."""
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise ConfigError(f"train.output_dir {run_dir} is a file; name a folder for the run")
    config = run_dir / "config.yaml"
    if (run_dir / CHECKPOINTS).is_dir() or (config.is_file() and
                                            config.read_text(errors="replace").startswith(CONFIG_HEADER)):
        return  # a run directory (checkpoints are checked against this run before they are used)
    clash = [name for name in RUN_FILES if (run_dir / name).exists()]
    if clash:
        raise ConfigError(f"train.output_dir {run_dir} holds {', '.join(clash)}, which flaxclf did not write; use "
                          "another train.output_dir (a new folder, or a flaxclf run directory)")


def write_run_files(run_dir: Path, cfg: RunConfig, problem_type: str, id2label: dict, loss: Any) -> None:
    """config.yaml (with the header that marks the folder as a run directory) and labels.json; process 0 only."""
    if jax.process_index() != 0:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(CONFIG_HEADER + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    labels = {"problem_type": problem_type, "id2label": id2label, "loss": dataclasses.asdict(loss)}
    (run_dir / "labels.json").write_text(json.dumps(labels, indent=2) + "\n")


def discard(run_dir: str | Path) -> None:
    """Removes what a run wrote that a fresh start must not carry on (only when the user asked for one): its
    checkpoints, those moved aside, its TensorBoard events and its summary. Files it did not write stay."""
    run_dir = Path(run_dir)
    shutil.rmtree(run_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(run_dir / (CHECKPOINTS + UNREADABLE_SUFFIX), ignore_errors=True)
    for events in (run_dir / "tb").glob("events.out.tfevents.*"):
        events.unlink()
    (run_dir / "summary.json").unlink(missing_ok=True)


def moved_aside(run_dir: str | Path) -> list[str]:
    """The checkpoint steps an earlier attempt moved to checkpoints.unreadable/."""
    aside = Path(run_dir) / (CHECKPOINTS + UNREADABLE_SUFFIX)
    return sorted(p.name for p in aside.iterdir()) if aside.is_dir() else []
