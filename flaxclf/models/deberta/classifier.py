"""DebertaV2ForSequenceClassification in Flax: the encoder, then ContextPooler (dropout -> dense ->
pooler_hidden_act on position 0) -> dropout (cls_dropout) -> classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.models.deberta.encoder import DebertaV2Model
from flaxclf.models.deberta.spec import DebertaV2Spec
from flaxclf.nn import segments as packing
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.dense import Dense
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.pooling import pool
from flaxclf.options import CLS_POOLINGS, HF_POOLING

if TYPE_CHECKING:
    from flaxclf.models.classifier import ClassifierConfig


class ContextPooler(nn.Module):
    """act(dense(dropout(h_0))), with pooler_dropout and pooler_hidden_act."""

    spec: DebertaV2Spec
    dtype: Any = jnp.float32

    def setup(self):
        s = self.spec
        self.dropout = Dropout(s.pooler_dropout)
        self.dense = Dense(s.hidden_size, s.hidden_size, jax.nn.initializers.normal(s.initializer_range),
                           dtype=self.dtype)

    def __call__(self, x, deterministic: bool = True):
        return ACTIVATIONS[self.spec.pooler_hidden_act](self.dense(self.dropout(x, deterministic=deterministic)))


class DebertaV2Classifier(nn.Module):
    """DebertaV2ForSequenceClassification in Flax; logits [B, num_labels] in fp32 whatever the compute dtype.

    flaxclf.models.interface.Classifier: `config` is a ClassifierConfig whose backbone is a DebertaV2Spec; token
    types are read where the config has them (type_vocab_size > 0), ignored otherwise. pooling=cls_pooler is
    PyTorch's head; cls, mean and max pool -> dropout -> classifier, without the ContextPooler."""

    config: ClassifierConfig
    dtype: Any = jnp.float32  # matmul input dtype; parameters keep their own
    remat: bool = False  # gradient checkpointing of each layer
    impl: str = "fast"  # flaxclf's own; transformers never had a Flax DeBERTa-v2

    def setup(self):
        s = self.config.backbone
        self.deberta = DebertaV2Model(s, self.dtype, self.remat)
        if self.config.pooling == HF_POOLING:
            self.pooler = ContextPooler(s, self.dtype)
        self.dropout = Dropout(self.config.dropout_rate)
        self.classifier = Dense(s.hidden_size, self.config.num_labels,
                                jax.nn.initializers.normal(s.initializer_range), dtype=self.dtype)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
                 segments: int | None = None):
        """Logits [B, C]; for packed rows (segments=S, attention_mask holding segment ids) [B, S, C]."""
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             segments=segments)
        return self.classify(hidden, attention_mask, deterministic=deterministic, segments=segments)

    def encode(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
               segments: int | None = None):
        """The final hidden states, [B, L, D]."""
        return self.deberta(input_ids, attention_mask, token_type_ids, deterministic, segments)[0]

    def hidden_states(self, input_ids, attention_mask, token_type_ids=None):
        """HF's output_hidden_states: the embeddings' and each layer's output."""
        return self.deberta(input_ids, attention_mask, token_type_ids, True)[1]

    def classify(self, hidden_BxLxD, attention_mask, *, deterministic: bool = True, segments: int | None = None):
        """Pooling -> (ContextPooler) -> dropout -> classifier, from final hidden states to fp32 logits."""
        how = "cls" if self.config.pooling in CLS_POOLINGS else self.config.pooling
        x = pool(hidden_BxLxD, attention_mask, how) if segments is None else \
            packing.pool(hidden_BxLxD, attention_mask, segments, how)
        if self.config.pooling == HF_POOLING:
            x = self.pooler(x, deterministic)
        return self.classifier(self.dropout(x, deterministic=deterministic)).astype(jnp.float32)
