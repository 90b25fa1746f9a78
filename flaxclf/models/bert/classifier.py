"""BertForSequenceClassification and its families' classifiers in Flax: the encoder (flaxclf.models.bert.encoder,
or transformers' FlaxBertModule with impl=hf) -> pooling -> the family's head -> dropout -> classifier."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.models.bert.encoder import FastBertModule
from flaxclf.models.bert.hf_flax import hf_flax_bert_module
from flaxclf.nn import segments as packing
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.nn.dropout import Dropout
from flaxclf.nn.pooling import pool
from flaxclf.options import CLS_POOLINGS, HF_POOLING

if TYPE_CHECKING:
    from flaxclf.models.classifier import ClassifierConfig


class Pooler(nn.Module):
    """The head's dense layer on [CLS]'s final hidden state, act(dense(h_cls)): BERT's and ALBERT's pooler (tanh),
    RoBERTa's classifier.dense (tanh), ELECTRA's (GELU), DistilBERT's pre_classifier (ReLU). The parameter names
    (pooler/dense) and init are transformers' FlaxBertPooler's; each family's names map onto them."""

    hidden_size: int
    initializer_range: float
    dtype: Any = jnp.float32
    activation: str = "tanh"

    @nn.compact
    def __call__(self, cls_xD: jax.Array) -> jax.Array:
        dense = nn.Dense(self.hidden_size, dtype=self.dtype, name="dense",
                         kernel_init=jax.nn.initializers.normal(self.initializer_range))
        return ACTIVATIONS[self.activation](dense(cls_xD))


class BertClassifier(nn.Module):
    """BertForSequenceClassification in Flax; logits come out in float32 whatever the compute dtype."""

    config: ClassifierConfig
    dtype: Any = jnp.float32  # compute dtype; the parameters keep their own dtype
    remat: bool = False  # gradient checkpointing of each encoder layer
    # "fast": flaxclf.models.bert.encoder, FlaxBertModule's params and math in a layout XLA runs faster; "hf":
    # transformers' FlaxBertModule itself, where the family's impls have it. Both hold the same parameter tree,
    # so weights move freely.
    impl: str = "fast"

    def setup(self):
        spec = self.config.backbone
        spec.family.check_impl(self.impl)
        if self.impl == "fast":
            self.bert = FastBertModule(spec, dtype=self.dtype, remat=self.remat)
        else:
            flax_bert_module = hf_flax_bert_module()
            self.bert = flax_bert_module(spec.to_hf_config(), dtype=self.dtype, add_pooling_layer=False,
                                         gradient_checkpointing=self.remat)
        if self.config.pooling == HF_POOLING:
            self.pooler = Pooler(spec.hidden_size, spec.initializer_range, dtype=self.dtype,
                                 activation=spec.family.head_activation)
        self.dropout = Dropout(rate=self.config.dropout_rate)
        init = jax.nn.initializers.normal(self.config.backbone.initializer_range)  # as HF's _init_weights
        self.classifier = nn.Dense(self.config.num_labels, dtype=self.dtype, kernel_init=init,
                                   bias_init=jax.nn.initializers.zeros)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
                 segments: int | None = None):
        """Logits [B, C]; for packed rows (segments=S, attention_mask holding segment ids) [B, S, C], one per
        text slot."""
        if segments is not None and self.impl != "fast":
            raise ValueError("packed rows (segments) need impl='fast': transformers' FlaxBertModule takes no "
                             "segment ids")
        # [CLS] poolings read each text's first position alone, so the fast backbone's last layer computes
        # those rows only.
        if self.impl == "fast" and self.config.pooling in CLS_POOLINGS:
            cls = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic, cls_only=True,
                            segments=segments)
            logits = self._head(cls, deterministic)
            return logits if segments is not None else logits[:, 0]
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             segments=segments)
        return self.classify(hidden, attention_mask, deterministic=deterministic, segments=segments)

    def encode(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
               segments: int | None = None):
        """The backbone's final hidden states, [B, L, D]."""
        if self.impl == "fast":
            return self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             segments=segments)
        out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic, return_dict=False)
        return out[0]

    def classify(self, hidden_BxLxD, attention_mask, *, deterministic: bool = True, segments: int | None = None):
        """Pooling -> (the family's dense layer) -> dropout -> classifier, from final hidden states to float32
        logits [B, C] (packed rows: [B, S, C])."""
        how = "cls" if self.config.pooling in CLS_POOLINGS else self.config.pooling
        if segments is not None:
            return self._head(packing.pool(hidden_BxLxD, attention_mask, segments, how), deterministic)
        if self.config.pooling == HF_POOLING:
            return self._head(hidden_BxLxD[:, :1], deterministic)[:, 0]
        return self._head(pool(hidden_BxLxD, attention_mask, how), deterministic)

    def _head(self, pooled_xD, deterministic: bool):
        """(the family's dense layer on the [CLS] vectors) -> dropout -> classifier, on vectors [..., D]."""
        x = pooled_xD
        if self.config.pooling == HF_POOLING:
            if self.config.backbone.family.head_dropout_first:  # RoBERTa's and ELECTRA's heads
                x = self.dropout(x, deterministic=deterministic)
            x = self.pooler(x)
        x = self.dropout(x, deterministic=deterministic)
        return self.classifier(x).astype(jnp.float32)
