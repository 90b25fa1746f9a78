"""The BERT-like encoders: BERT, RoBERTa (XLM-R, CamemBERT), ELECTRA, DistilBERT and ALBERT, as data
(families.py) over one encoder (encoder.py) and one classifier (classifier.py)."""

from flaxclf.models.bert import families
from flaxclf.models.bert.classifier import BertClassifier
from flaxclf.models.bert.spec import BertSpec
from flaxclf.models.interface import Encoder

ENCODER = Encoder(name="bert", families=families.FAMILIES, spec_class=BertSpec, make=BertClassifier,
                  sharding_rules=families.SHARDING_RULES, decays=families.decays, describe=families.describe)

__all__ = ["ENCODER", "BertClassifier", "BertSpec"]
