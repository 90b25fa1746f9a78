"""ModernBERT: rotary positions, alternating local and global attention, GeGLU, pre-norm layers."""

from flaxclf.models.interface import Encoder
from flaxclf.models.modernbert import family
from flaxclf.models.modernbert.classifier import ModernBertClassifier
from flaxclf.models.modernbert.spec import AttentionImpl, ModernBertSpec

ENCODER = Encoder(name="modernbert", families=(family.FAMILY,), spec_class=ModernBertSpec,
                  make=ModernBertClassifier, sharding_rules=family.SHARDING_RULES, decays=family.decays,
                  describe=family.describe)

__all__ = ["ENCODER", "AttentionImpl", "ModernBertClassifier", "ModernBertSpec"]
