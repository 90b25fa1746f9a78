"""The classifier's config (the encoder's spec plus the head and its labels) and the one way to build its module,
whatever the family: make_classifier looks the encoder up in flaxclf.models.registry."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp

from flaxclf.models import registry
from flaxclf.models.bert.spec import BertSpec
from flaxclf.models.interface import Classifier, Encoder, EncoderSpec
from flaxclf.nn import lora
from flaxclf.nn.lora import LoraSpec
from flaxclf.options import HF_POOLING, POOLINGS, PROBLEM_TYPES, REGRESSION, Pooling


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that fixes the classifier's math and its labels; separate from the run config."""

    backbone: EncoderSpec = field(default_factory=BertSpec)
    num_labels: int = 2
    pooling: Pooling = HF_POOLING
    problem_type: str | None = None  # None: decided from the labels, as PyTorch does
    classifier_dropout: float | None = None  # None: backbone.hidden_dropout_prob
    label_names: tuple[str, ...] = ()
    lora: LoraSpec | None = None  # a LoRA adapter on some of the encoder's Dense layers (flaxclf.nn.lora)

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not known; use one of {', '.join(POOLINGS)}")
        backbone, pooling = self.backbone.with_pooling(self.pooling)
        object.__setattr__(self, "backbone", backbone)
        object.__setattr__(self, "pooling", pooling)
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not known; use one of {', '.join(PROBLEM_TYPES)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.problem_type == REGRESSION and self.num_labels != 1:
            raise ValueError(f"regression needs num_labels == 1, got {self.num_labels}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for num_labels={self.num_labels}")

    @property
    def encoder(self) -> Encoder:
        """The encoder folder's entry that computes this classifier: its module, sharding rules, decay rule and
        inspect's lines."""
        return registry.encoder_of(self.backbone)

    @property
    def head_dropout(self) -> float | None:
        """classifier_dropout, or where it is None the family's own default (DistilBERT's seq_classif_dropout 0.2,
        ALBERT's classifier_dropout_prob 0.1); None still for the families that fall back to hidden_dropout_prob."""
        cd = self.classifier_dropout
        return self.backbone.family.classifier_dropout_default if cd is None else cd

    @property
    def dropout_rate(self) -> float:
        cd = self.head_dropout
        return self.backbone.hidden_dropout_prob if cd is None else cd

    @property
    def id2label(self) -> dict[int, str]:
        names = self.label_names or tuple(f"LABEL_{i}" for i in range(self.num_labels))
        return dict(enumerate(names))

    def replace(self, **changes: Any) -> ClassifierConfig:
        return replace(self, **changes)

    @classmethod
    def from_hf(cls, hf: dict[str, Any], **overrides: Any) -> ClassifierConfig:
        """From a config.json's fields; its num_labels/id2label/problem_type/classifier_dropout are defaults."""
        id2label = {int(k): v for k, v in (hf.get("id2label") or {}).items()}
        names = tuple(id2label[i] for i in sorted(id2label))
        # As PretrainedConfig: id2label fixes num_labels; without either a head has 2 outputs.
        num_labels = len(names) or hf.get("num_labels") or 2
        if names and all(n == f"LABEL_{i}" for i, n in enumerate(names)):
            names = ()  # HF's placeholder names carry no information
        backbone = registry.spec_from_hf(hf)
        family = backbone.family
        fields = dict(backbone=backbone, num_labels=num_labels, label_names=names, problem_type=hf.get("problem_type"),
                      classifier_dropout=hf.get(family.classifier_dropout_key, family.classifier_dropout_default))
        fields.update({k: v for k, v in overrides.items()})
        if "num_labels" in overrides and "label_names" not in overrides and \
                len(fields["label_names"]) != fields["num_labels"]:
            fields["label_names"] = ()
        return cls(**fields)

    def to_hf(self) -> dict[str, Any]:
        """config.json's fields, as the family's PyTorch *ForSequenceClassification.from_pretrained reads this
        classifier. HF keeps num_labels implicit in id2label; it is written out too so that people and other tools
        see it."""
        id2label = {str(k): v for k, v in self.id2label.items()}
        family = self.backbone.family
        return self.backbone.to_hf(
            architectures=[family.architectures[self.backbone.model_type]], num_labels=self.num_labels,
            id2label=id2label, label2id={v: int(k) for k, v in id2label.items()}, problem_type=self.problem_type,
            **{family.classifier_dropout_key: self.head_dropout})

    def to_hf_config(self):
        """The same as a transformers.BertConfig (imports transformers: for its own models)."""
        return self.backbone.to_hf_config(**{k: v for k, v in self.to_hf().items() if k not in self.backbone.to_hf()})


def make_classifier(config: ClassifierConfig, dtype: Any = jnp.float32, remat: bool = False,
                    impl: str = "fast") -> Classifier:
    """The Flax module of `config`'s family (flaxclf.models.interface.Classifier): BertClassifier for the
    BERT-like families, ModernBertClassifier for ModernBERT, ..."""
    config.backbone.family.check_impl(impl)
    return config.encoder.make(config, dtype=dtype, remat=remat, impl=impl)


def dummy_inputs(batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
    ids = jnp.zeros((batch, length), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)


def init_params(model: Classifier, rng: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Fresh variables (HF's initializers, and a fresh adapter where the config has one), cast to the storage
    dtype."""
    variables = lora.add(model.init(rng, **dummy_inputs()), model.config.lora, jax.random.fold_in(rng, 2))
    return cast_floats(variables, param_dtype)


def abstract_variables(model: Classifier) -> dict:
    """The shapes and dtypes of the model's variables (its adapter's included), with no memory allocated."""
    return lora.add_abstract(jax.eval_shape(model.init, jax.random.PRNGKey(0), **dummy_inputs()), model.config.lora)


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Casts the floating leaves of a tree (parameters are fp32 unless param_dtype says otherwise)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree.map(cast, tree)
