"""flaxclf: PyTorch's BertForSequenceClassification (and RoBERTa's, ELECTRA's, DistilBERT's, ALBERT's and
ModernBERT's) in JAX/Flax, with a sharded fine-tuning job around it."""

from flaxclf.model import BertClassifier, ClassifierConfig, make_classifier
from flaxclf.modernbert import ModernBertClassifier, ModernBertSpec
from flaxclf.weights import export_hf, from_pretrained

__all__ = ["BertClassifier", "ClassifierConfig", "ModernBertClassifier", "ModernBertSpec", "export_hf",
           "from_pretrained", "make_classifier"]
__version__ = "0.1.0"
