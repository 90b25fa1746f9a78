"""flaxclf: PyTorch's BertForSequenceClassification (and RoBERTa's, ELECTRA's, DistilBERT's, ALBERT's) in JAX/Flax,
with a sharded fine-tuning job around it."""

from flaxclf.model import BertClassifier, ClassifierConfig
from flaxclf.weights import export_hf, from_pretrained

__all__ = ["BertClassifier", "ClassifierConfig", "export_hf", "from_pretrained"]
__version__ = "0.1.0"
