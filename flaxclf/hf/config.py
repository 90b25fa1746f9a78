"""A model folder's config.json, read without transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flaxclf.models import registry


def read_hf_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a local HF folder; other model types are refused with the type named."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; point at a Hugging Face model folder")
    try:
        hf = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); save the model again with save_pretrained") from None
    if not isinstance(hf, dict):
        raise ValueError(f"{path} holds a {type(hf).__name__}, not a config object")
    model_type = hf.get("model_type", "bert")
    if model_type not in registry.MODEL_TYPES:
        raise ValueError(f"{path} is a {model_type!r} model; flaxclf loads {', '.join(sorted(registry.MODEL_TYPES))}")
    return hf


def max_positions(model_dir: Path) -> int | None:
    """The longest max_length the model takes (its max_position_embeddings, less RoBERTa's padding_idx + 1
    unused rows); None without a config.json."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    hf = json.loads(path.read_text())
    try:
        return registry.spec_from_hf(hf).max_length
    except ValueError:  # a model flaxclf does not load: reading its weights says so, in its own words
        return hf.get("max_position_embeddings")
