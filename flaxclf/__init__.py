"""flaxclf: PyTorch's BertForSequenceClassification (and RoBERTa's, ELECTRA's, DistilBERT's, ALBERT's and
ModernBERT's) in JAX/Flax, with a sharded fine-tuning job around it."""

from flaxclf.hf.weights import export_hf, from_pretrained
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.classifier import ClassifierConfig, make_classifier
from flaxclf.models.modernbert import ModernBertClassifier, ModernBertSpec
from flaxclf.runtime.hostmem import keep_freed_memory

__all__ = ["BertClassifier", "BertSpec", "ClassifierConfig", "ModernBertClassifier", "ModernBertSpec", "export_hf",
           "from_pretrained", "keep_freed_memory", "make_classifier"]
__version__ = "0.1.0"
