"""The classifier: encoder -> pooling -> the family's head, as PyTorch's *ForSequenceClassification (BERT,
RoBERTa/XLM-R/CamemBERT, ELECTRA, DistilBERT, ALBERT: flaxclf.families; ModernBERT: flaxclf.modernbert)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.backbone import BertSpec, hf_flax_bert_module, spec_from_hf
from flaxclf.fast_bert import ACTIVATIONS, FastBertModule
from flaxclf.modernbert import ModernBertClassifier, ModernBertSpec
from flaxclf.vocab import CLS_POOLINGS, HF_POOLING, IMPLS, POOLINGS, PROBLEM_TYPES, REGRESSION, Pooling


@dataclass(frozen=True)
class ClassifierConfig:
    """Everything that fixes the classifier's math and its labels; separate from the run config."""

    backbone: BertSpec | ModernBertSpec = field(default_factory=BertSpec)
    num_labels: int = 2
    pooling: Pooling = HF_POOLING
    problem_type: str | None = None  # None: decided from the labels, as PyTorch does
    classifier_dropout: float | None = None  # None: backbone.hidden_dropout_prob
    label_names: tuple[str, ...] = ()

    def __post_init__(self):
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not known; use one of {', '.join(POOLINGS)}")
        if isinstance(self.backbone, ModernBertSpec) and self.pooling != HF_POOLING:
            # ModernBERT's own head pools by classifier_pooling, cls or mean, and PyTorch's class has both: the
            # choice goes into the spec (and so into an export's config.json), and the head stays the family's.
            if self.pooling not in ("cls", "mean"):
                raise ValueError(f"pooling {self.pooling!r} is not one of ModernBERT's; use cls, mean or "
                                 f"{HF_POOLING} (the checkpoint's classifier_pooling)")
            object.__setattr__(self, "backbone", replace(self.backbone, classifier_pooling=self.pooling))
            object.__setattr__(self, "pooling", HF_POOLING)
        if self.problem_type is not None and self.problem_type not in PROBLEM_TYPES:
            raise ValueError(f"problem_type {self.problem_type!r} is not known; use one of {', '.join(PROBLEM_TYPES)}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be >= 1, got {self.num_labels}")
        if self.problem_type == REGRESSION and self.num_labels != 1:
            raise ValueError(f"regression needs num_labels == 1, got {self.num_labels}")
        if self.label_names and len(self.label_names) != self.num_labels:
            raise ValueError(f"{len(self.label_names)} label names for num_labels={self.num_labels}")

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
        backbone = spec_from_hf(hf)
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


class Pooler(nn.Module):
    """The head's dense layer on position 0, act(dense(h[:, 0])): BERT's and ALBERT's pooler (tanh), RoBERTa's
    classifier.dense (tanh), ELECTRA's (GELU), DistilBERT's pre_classifier (ReLU). The parameter names
    (pooler/dense) and init are transformers' FlaxBertPooler's; flaxclf.families maps them to each family's."""

    hidden_size: int
    initializer_range: float
    dtype: Any = jnp.float32
    activation: str = "tanh"

    @nn.compact
    def __call__(self, hidden_BxLxD: jax.Array) -> jax.Array:
        dense = nn.Dense(self.hidden_size, dtype=self.dtype, name="dense",
                         kernel_init=jax.nn.initializers.normal(self.initializer_range))
        return ACTIVATIONS[self.activation](dense(hidden_BxLxD[:, 0]))


def pool(hidden_BxLxD: jax.Array, mask_BxL: jax.Array, pooling: str) -> jax.Array:
    """The vector each strategy hands on: position 0, or the masked mean / max over real tokens."""
    if pooling in CLS_POOLINGS:
        return hidden_BxLxD[:, 0]
    m = mask_BxL[..., None].astype(jnp.float32)
    h = hidden_BxLxD.astype(jnp.float32)
    if pooling == "mean":
        out = (h * m).sum(1) / jnp.maximum(m.sum(1), 1.0)
    else:  # max: padding can never win, and an all-pad row gives 0 rather than -inf
        out = jnp.where(m > 0, h, -jnp.inf).max(1)
        out = jnp.where(jnp.isfinite(out), out, 0.0)
    return out.astype(hidden_BxLxD.dtype)


class BertClassifier(nn.Module):
    """BertForSequenceClassification in Flax; logits come out in float32 whatever the compute dtype."""

    config: ClassifierConfig
    dtype: Any = jnp.float32  # compute dtype; the parameters keep their own dtype
    remat: bool = False  # gradient checkpointing of each encoder layer
    # "fast": flaxclf.fast_bert, FlaxBertModule's params and math in a layout XLA runs faster (bench/README.md);
    # "hf": transformers' FlaxBertModule itself. Both hold the same parameter tree, so weights move freely.
    impl: str = "fast"

    def setup(self):
        if self.impl not in IMPLS:
            raise ValueError(f"impl {self.impl!r} is not known; use one of {', '.join(IMPLS)}")
        spec = self.config.backbone
        if self.impl == "hf" and spec.family.name != "bert":
            raise ValueError(f"impl 'hf' is transformers' FlaxBertModule, for BERT; a {spec.model_type} model needs "
                             "impl 'fast'")
        if self.impl == "fast":
            self.bert = FastBertModule(spec, dtype=self.dtype, remat=self.remat)
        else:
            flax_bert_module = hf_flax_bert_module()
            self.bert = flax_bert_module(spec.to_hf_config(), dtype=self.dtype, add_pooling_layer=False,
                                         gradient_checkpointing=self.remat)
        if self.config.pooling == HF_POOLING:
            self.pooler = Pooler(spec.hidden_size, spec.initializer_range, dtype=self.dtype,
                                 activation=spec.family.head_activation)
        self.dropout = nn.Dropout(rate=self.config.dropout_rate)
        init = jax.nn.initializers.normal(self.config.backbone.initializer_range)  # as HF's _init_weights
        self.classifier = nn.Dense(self.config.num_labels, dtype=self.dtype, kernel_init=init,
                                   bias_init=jax.nn.initializers.zeros)

    def __call__(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True):
        # [CLS] poolings read position 0 alone, so the fast backbone's last layer computes that row only.
        cls_only = self.impl == "fast" and self.config.pooling in CLS_POOLINGS
        hidden = self.encode(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             cls_only=cls_only)
        return self.classify(hidden, attention_mask, deterministic=deterministic)

    def encode(self, input_ids, attention_mask, token_type_ids=None, *, deterministic: bool = True,
               cls_only: bool = False):
        """The backbone's final hidden states, [B, L, D]; with cls_only (fast impl) position 0's alone, [B, 1, D]."""
        if self.impl == "fast":
            return self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic,
                             cls_only=cls_only)
        if cls_only:
            raise ValueError("cls_only needs impl='fast'; transformers' FlaxBertModule computes every position")
        out = self.bert(input_ids, attention_mask, token_type_ids, deterministic=deterministic, return_dict=False)
        return out[0]

    def classify(self, hidden_BxLxD, attention_mask, *, deterministic: bool = True):
        """Pooling -> (the family's dense layer) -> dropout -> classifier, from final hidden states to float32
        logits [B, C]."""
        if self.config.pooling == HF_POOLING:
            if self.config.backbone.family.head_dropout_first:  # RoBERTa's and ELECTRA's heads
                hidden_BxLxD = self.dropout(hidden_BxLxD[:, :1], deterministic=deterministic)
            x = self.pooler(hidden_BxLxD)
        else:
            x = pool(hidden_BxLxD, attention_mask, self.config.pooling)
        x = self.dropout(x, deterministic=deterministic)
        return self.classifier(x).astype(jnp.float32)


def make_classifier(config: ClassifierConfig, dtype: Any = jnp.float32, remat: bool = False,
                    impl: str = "fast") -> BertClassifier | ModernBertClassifier:
    """The Flax module of `config`'s family: BertClassifier, or ModernBertClassifier for ModernBERT (the same
    interface: __call__, encode, classify)."""
    if isinstance(config.backbone, ModernBertSpec):
        if impl != "fast":
            raise ValueError(f"impl {impl!r} is transformers' FlaxBertModule, for BERT; a modernbert model needs "
                             "impl 'fast'")
        return ModernBertClassifier(config, dtype=dtype, remat=remat)
    return BertClassifier(config, dtype=dtype, remat=remat, impl=impl)


def dummy_inputs(batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
    ids = jnp.zeros((batch, length), jnp.int32)
    return dict(input_ids=ids, attention_mask=jnp.ones_like(ids), token_type_ids=ids)


def init_params(model: BertClassifier, rng: jax.Array, param_dtype: Any = jnp.float32) -> dict:
    """Fresh parameters (HF's initializers), cast to the storage dtype."""
    params = model.init(rng, **dummy_inputs())
    return cast_floats(params, param_dtype)


def cast_floats(tree: Any, dtype: Any) -> Any:
    """Casts the floating leaves of a tree (parameters are fp32 unless param_dtype says otherwise)."""
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x
    return jax.tree.map(cast, tree)
