"""DeBERTa-v2 and v3: disentangled attention over relative positions, computed with matmuls and a skew (no
[B, H, L, L] gathers), a ContextPooler head."""

from flaxclf.models.deberta import family
from flaxclf.models.deberta.classifier import DebertaV2Classifier
from flaxclf.models.deberta.spec import DebertaV2Spec
from flaxclf.models.interface import Encoder

ENCODER = Encoder(name="deberta", families=(family.FAMILY,), spec_class=DebertaV2Spec, make=DebertaV2Classifier,
                  sharding_rules=family.SHARDING_RULES, decays=family.decays, describe=family.describe)

__all__ = ["ENCODER", "DebertaV2Classifier", "DebertaV2Spec"]
