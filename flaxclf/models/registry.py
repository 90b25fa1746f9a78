"""The encoders flaxclf computes, and the families each serves. A new encoder is a folder under flaxclf.models
with an ENCODER entry (flaxclf.models.interface.Encoder), and one line in ENCODERS below."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flaxclf.models import bert, deberta, modernbert
from flaxclf.models.family import Family
from flaxclf.models.interface import Encoder, EncoderSpec

ENCODERS: dict[str, Encoder] = {e.name: e for e in (
    bert.ENCODER,
    modernbert.ENCODER,
    deberta.ENCODER,
)}

FAMILIES: dict[str, Family] = {f.name: f for e in ENCODERS.values() for f in e.families}
MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_of(model_type: str) -> Family:
    """The family of a config.json's model_type; an unknown one raises, naming those that load."""
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; flaxclf loads "
                         f"{', '.join(sorted(MODEL_TYPES))}") from None


def encoder_of(spec: EncoderSpec) -> Encoder:
    return ENCODERS[spec.family.encoder]


def spec_from_hf(hf: Mapping[str, Any]) -> EncoderSpec:
    """The encoder spec of a config.json's fields (BertSpec, ModernBertSpec, ...)."""
    family = family_of(hf.get("model_type", "bert"))
    return ENCODERS[family.encoder].spec_class.from_hf(hf)
