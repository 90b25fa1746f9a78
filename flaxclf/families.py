"""The encoder families flaxclf loads, as data over one encoder (flaxclf.fast_bert) and one head (flaxclf.model).

Each family is what its transformers *ForSequenceClassification does differently from BERT's:
  * embeddings: token types or none, positions counted from padding_idx + 1 (RoBERTa), a factorized embedding
    size with a projection to the hidden size (ELECTRA when they differ, ALBERT always);
  * layers: which dropouts follow the attention and feed-forward outputs, and which weights each layer position
    uses (ALBERT shares one layer's weights across positions);
  * head: the dense layer on position 0 (BERT's pooler, RoBERTa's classifier.dense, DistilBERT's pre_classifier),
    its activation, and whether a dropout comes before it;
  * names: config.json's keys and the state dict's module names, mapped onto flaxclf's canonical parameter tree.

flaxclf's parameter tree is the same for every BERT-like family: the encoder under bert/ with BERT's module names,
the head's dense layer at pooler/dense and the last linear layer at classifier. So sharding rules, checkpoints,
inspect and the optimizer's decay mask hold for every family; names change only at the Hugging Face boundary
(flaxclf.weights). ModernBERT (encoder "modernbert") is another encoder (flaxclf.modernbert) whose tree is its
PyTorch names, so its family entry renames nothing."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

# Module names of transformers' BERT, the canonical tree. "{n}" stands for a layer index.
_BERT_LAYER = "bert.encoder.layer.{n}."


@dataclass(frozen=True)
class Family:
    name: str  # the canonical model_type
    architectures: dict[str, str]  # model_type -> its *ForSequenceClassification class (config.json's architectures)
    prefix: str  # the base model's attribute in *ForSequenceClassification (state-dict prefix)
    # Embeddings.
    token_types: bool = True
    positions_from_padding: bool = False  # RoBERTa: position ids pad + cumsum(ids != pad), pad at padding
    embedding_project: str = "never"  # "never", "if_smaller" (ELECTRA: embedding_size != hidden_size), "always"
    # Layers.
    attention_output_dropout: bool = True  # dropout on the attention's output projection, before the residual
    ffn_output_dropout: bool = True  # dropout on the feed-forward output, before the residual
    shared_layers: bool = False  # ALBERT: num_hidden_groups weight sets serve num_hidden_layers positions
    # Head: [dropout] -> dense -> activation -> dropout -> classifier, on position 0.
    head_activation: str = "tanh"
    head_dropout_first: bool = False
    head_names: str = "pooler"  # what the head's dense layer is in HF's terms, for inspect and errors
    head_is_new: bool = False  # the dense layer belongs to the classification head (new on a base checkpoint)
    classifier_dropout_key: str = "classifier_dropout"
    classifier_dropout_default: float | None = None  # None: hidden_dropout_prob
    # config.json: the HF key of each BertSpec field it renames, and HF's defaults where BERT's differ.
    config_keys: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, Any] = field(default_factory=dict)
    model_type_defaults: dict[str, dict[str, Any]] = field(default_factory=dict)  # where a variant's class differs
    unused: tuple[str, ...] = ()  # BertSpec fields the family's config.json does not have
    position_embedding_type: bool = True  # whether its config.json has that key (DistilBERT's has none)
    # State dict: (HF module prefix, canonical module prefix), longest prefix first at use; weights of other
    # heads (pretraining, language modelling) that a classifier ignores.
    names: tuple[tuple[str, str], ...] = ()
    ignored: tuple[str, ...] = ()
    # The module that computes it: "bert" (flaxclf.fast_bert and the head in flaxclf.model) or "modernbert"
    # (flaxclf.modernbert, with its own head: pooling by classifier_pooling, dense, activation, norm).
    encoder: str = "bert"
    head_path: str = "pooler"  # the head's dense layer(s) before the classifier, in flaxclf's tree

    def hf_key(self, spec_field: str) -> str:
        return self.config_keys.get(spec_field, spec_field)

    def defaults_for(self, model_type: str) -> dict[str, Any]:
        """What transformers' config class for model_type gives a field that config.json leaves out, where BERT's
        default differs."""
        return {**self.defaults, **self.model_type_defaults.get(model_type, {})}

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family(
        name="bert", architectures={"bert": "BertForSequenceClassification"}, prefix="bert",
        head_names="pooler (dense + tanh)",
        names=(("bert.pooler.", "pooler."), ("bert.", "bert."), ("classifier.", "classifier.")),
        ignored=("cls.",)),
    Family(
        name="roberta", prefix="roberta",
        architectures={"roberta": "RobertaForSequenceClassification",
                       "xlm-roberta": "XLMRobertaForSequenceClassification",
                       "camembert": "CamembertForSequenceClassification"},
        positions_from_padding=True, head_dropout_first=True, head_is_new=True,
        head_names="classifier.dense + tanh (RobertaClassificationHead)",
        defaults=dict(pad_token_id=1), model_type_defaults={"roberta": dict(vocab_size=50265)},
        names=(("roberta.", "bert."), ("classifier.dense.", "pooler.dense."), ("classifier.out_proj.", "classifier.")),
        # RobertaModel's own pooler exists in some base checkpoints; RobertaForSequenceClassification has none.
        ignored=("lm_head.", "roberta.pooler.")),
    Family(
        name="electra", architectures={"electra": "ElectraForSequenceClassification"}, prefix="electra",
        embedding_project="if_smaller", head_activation="gelu", head_dropout_first=True, head_is_new=True,
        head_names="classifier.dense + GELU (ElectraClassificationHead)",
        defaults=dict(embedding_size=128, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
        names=(("electra.", "bert."), ("classifier.dense.", "pooler.dense."), ("classifier.out_proj.", "classifier.")),
        ignored=("discriminator_predictions.", "generator_predictions.", "generator_lm_head.")),
    Family(
        name="distilbert", architectures={"distilbert": "DistilBertForSequenceClassification"}, prefix="distilbert",
        token_types=False, attention_output_dropout=False, head_activation="relu", head_is_new=True,
        head_names="pre_classifier + ReLU",
        classifier_dropout_key="seq_classif_dropout", classifier_dropout_default=0.2,
        config_keys=dict(hidden_size="dim", num_hidden_layers="n_layers", num_attention_heads="n_heads",
                         intermediate_size="hidden_dim", hidden_act="activation", hidden_dropout_prob="dropout",
                         attention_probs_dropout_prob="attention_dropout"),
        defaults=dict(num_hidden_layers=6, type_vocab_size=0), unused=("type_vocab_size", "layer_norm_eps"),
        position_embedding_type=False,
        names=(("distilbert.embeddings.", "bert.embeddings."),
               ("distilbert.transformer.layer.{n}.attention.q_lin.", _BERT_LAYER + "attention.self.query."),
               ("distilbert.transformer.layer.{n}.attention.k_lin.", _BERT_LAYER + "attention.self.key."),
               ("distilbert.transformer.layer.{n}.attention.v_lin.", _BERT_LAYER + "attention.self.value."),
               ("distilbert.transformer.layer.{n}.attention.out_lin.", _BERT_LAYER + "attention.output.dense."),
               ("distilbert.transformer.layer.{n}.sa_layer_norm.", _BERT_LAYER + "attention.output.LayerNorm."),
               ("distilbert.transformer.layer.{n}.ffn.lin1.", _BERT_LAYER + "intermediate.dense."),
               ("distilbert.transformer.layer.{n}.ffn.lin2.", _BERT_LAYER + "output.dense."),
               ("distilbert.transformer.layer.{n}.output_layer_norm.", _BERT_LAYER + "output.LayerNorm."),
               ("pre_classifier.", "pooler.dense."), ("classifier.", "classifier.")),
        ignored=("vocab_transform.", "vocab_layer_norm.", "vocab_projector.")),
    Family(
        name="albert", architectures={"albert": "AlbertForSequenceClassification"}, prefix="albert",
        embedding_project="always", ffn_output_dropout=False, shared_layers=True,
        head_names="pooler (dense + tanh)",
        classifier_dropout_key="classifier_dropout_prob", classifier_dropout_default=0.1,
        defaults=dict(vocab_size=30000, embedding_size=128, hidden_size=4096, num_attention_heads=64,
                      intermediate_size=16384, hidden_act="gelu_new", hidden_dropout_prob=0.0,
                      attention_probs_dropout_prob=0.0),
        names=(("albert.encoder.embedding_hidden_mapping_in.", "bert.embeddings_project."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.attention.query.",
                _BERT_LAYER + "attention.self.query."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.attention.key.",
                _BERT_LAYER + "attention.self.key."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.attention.value.",
                _BERT_LAYER + "attention.self.value."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.attention.dense.",
                _BERT_LAYER + "attention.output.dense."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.attention.LayerNorm.",
                _BERT_LAYER + "attention.output.LayerNorm."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.ffn.", _BERT_LAYER + "intermediate.dense."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.ffn_output.", _BERT_LAYER + "output.dense."),
               ("albert.encoder.albert_layer_groups.{n}.albert_layers.0.full_layer_layer_norm.",
                _BERT_LAYER + "output.LayerNorm."),
               ("albert.pooler.", "pooler.dense."), ("albert.", "bert."), ("classifier.", "classifier.")),
        ignored=("predictions.", "sop_classifier.")),
    Family(
        name="modernbert", architectures={"modernbert": "ModernBertForSequenceClassification"}, prefix="model",
        encoder="modernbert", token_types=False, head_is_new=True, head_path="head",
        head_names="head (classifier_pooling cls or mean -> dense -> activation -> norm)",
        classifier_dropout_default=0.0,
        names=(("model.", "model."), ("head.", "head."), ("classifier.", "classifier.")),
        # ModernBertForMaskedLM's decoder; its `head` is the classifier's own prediction head, and is kept.
        ignored=("decoder.",)),
)}

MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES.values() for t in f.model_types}


def family_of(model_type: str) -> Family:
    """The family of a config.json's model_type; an unknown one raises, naming those that load."""
    try:
        return MODEL_TYPES[model_type]
    except KeyError:
        raise ValueError(f"model_type {model_type!r} is not supported; flaxclf loads "
                         f"{', '.join(sorted(MODEL_TYPES))}") from None


@cache
def _compile(pairs: tuple[tuple[str, str], ...]) -> list[tuple[re.Pattern, str]]:
    """(pattern, replacement) per prefix pair, the longest prefix first so specific names beat generic ones."""
    out = []
    for src, dst in sorted(pairs, key=lambda p: -len(p[0])):
        pattern = re.escape(src).replace(re.escape("{n}"), r"(\d+)")
        out.append((re.compile(pattern), dst.replace("{n}", r"\1")))
    return out


def rename(name: str, pairs: tuple[tuple[str, str], ...]) -> str | None:
    """`name` with its longest matching prefix renamed by `pairs`; None when no prefix matches."""
    for pattern, replacement in _compile(pairs):
        m = pattern.match(name)
        if m:
            return m.expand(replacement) + name[m.end():]
    return None


def to_canonical(family: Family, hf_name: str) -> str | None:
    """A state-dict name (with or without the base model's prefix) in canonical dotted form; None if unknown."""
    out = rename(hf_name, family.names)
    if out is None and not hf_name.startswith(family.prefix + "."):
        out = rename(f"{family.prefix}.{hf_name}", family.names)
    return out


def to_hf(family: Family, canonical: str) -> str:
    out = rename(canonical, tuple((dst, src) for src, dst in family.names))
    if out is None:
        raise KeyError(f"{canonical} has no {family.name} name")
    return out


def is_ignored(family: Family, hf_name: str) -> bool:
    # Buffers (position_ids, token_type_ids) and other tasks' heads are not weights of a classifier.
    # A base model's checkpoint names its weights without the prefix (RobertaModel's pooler.dense.weight).
    names = (hf_name, f"{family.prefix}.{hf_name}")
    return (hf_name.endswith(("position_ids", "token_type_ids"))
            or any(n.startswith(p) for n in names for p in family.ignored))
