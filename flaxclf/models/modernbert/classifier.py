"""ModernBertForSequenceClassification in Flax: the encoder, then pooling by classifier_pooling -> head.dense ->
activation -> head.norm -> dropout -> classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax.numpy as jnp

from flaxclf.models.modernbert.encoder import ModernBertModel, dense, norm, std_out
from flaxclf.models.modernbert.spec import AttentionImpl, ModernBertSpec
from flaxclf.nn import segments as packing
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.pooling import pool

if TYPE_CHECKING:
    from flaxclf.models.classifier import ClassifierConfig


class _Head(nn.Module):
    """ModernBertPredictionHead: norm(act(dense(x)))."""

    spec: ModernBertSpec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dense = dense(s, s.hidden_size, s.hidden_size, s.classifier_bias, std_out(s), self.dtype)
        self.norm = norm(s)

    def __call__(self, x):
        return self.norm(ACTIVATIONS[self.spec.classifier_activation](self.dense(x)))


class ModernBertClassifier(nn.Module):
    """ModernBertForSequenceClassification in Flax; logits [B, num_labels] in fp32 whatever the compute dtype.

    flaxclf.models.interface.Classifier: `config` is a ClassifierConfig whose backbone is a ModernBertSpec;
    token_type_ids are accepted and ignored, as ModernBERT has none."""

    config: ClassifierConfig
    dtype: Any = jnp.float32  # matmul input dtype; parameters keep their own
    remat: bool = False  # gradient checkpointing of each layer
    impl: str = "fast"  # flaxclf's own; transformers never had a Flax ModernBERT
    attention: AttentionImpl = AttentionImpl()

    def setup(self):
        s = self.config.backbone
        self.model = ModernBertModel(s, self.dtype, self.attention, self.remat)
        self.head = _Head(s, self.dtype)
        self.drop = Dropout(self.config.dropout_rate)
        self.classifier = dense(s, s.hidden_size, self.config.num_labels, True, s.hidden_size ** -0.5, self.dtype)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
                 segments: int | None = None):
        """Logits [B, C]; for packed rows (segments=S, attention_mask holding segment ids) [B, S, C]."""
        hidden = self.encode(input_ids, attention_mask, deterministic=deterministic, segments=segments)
        return self.classify(hidden, attention_mask, deterministic=deterministic, segments=segments)

    def encode(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
               segments: int | None = None):
        """The final hidden states after final_norm, [B, L, D]."""
        return self.model(input_ids, attention_mask, deterministic, segments=segments)[0]

    def hidden_states(self, input_ids, attention_mask):
        """HF's output_hidden_states: the embeddings' and each layer's output (before final_norm)."""
        return self.model(input_ids, attention_mask, True, every_state=True)[1]

    def classify(self, hidden_BxLxD, attention_mask, *, deterministic: bool = True, segments: int | None = None):
        """From final hidden states to fp32 logits: pooling -> prediction head -> dropout -> classifier."""
        how = self.config.backbone.classifier_pooling
        x = self.head(pool(hidden_BxLxD, attention_mask, how) if segments is None else
                      packing.pool(hidden_BxLxD, attention_mask, segments, how))
        return self.classifier(self.drop(x, deterministic=deterministic)).astype(jnp.float32)
