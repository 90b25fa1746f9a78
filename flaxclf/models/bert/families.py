"""The BERT-like families as data over one encoder (flaxclf.models.bert.encoder) and one head
(flaxclf.models.bert.classifier), and what the rest of flaxclf needs to know of their parameter tree.

The tree is the same for every family here: the encoder under bert/ with BERT's module names, the head's dense
layer at pooler/dense and the last linear layer at classifier. So the sharding rules, the decay mask and inspect's
lines below hold for all of them; names change only at the Hugging Face boundary (Family.names). A new BERT-like
family is one more entry in FAMILIES."""

from __future__ import annotations

from typing import Any

from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec as P

from flaxclf.models.family import Family
from flaxclf.models.interface import POSITIONS, Rows, count_params
from flaxclf.options import HF_POOLING

# Module names of transformers' BERT, the canonical tree. "{n}" stands for a layer index.
_BERT_LAYER = "bert.encoder.layer.{n}."

FAMILIES: tuple[Family, ...] = (
    Family(
        name="bert", architectures={"bert": "BertForSequenceClassification"}, prefix="bert",
        head_names="pooler (dense + tanh)", impls=("fast", "hf"),
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
        lora_targets=("q_lin", "v_lin"),
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
)

MODEL_TYPES: dict[str, Family] = {t: f for f in FAMILIES for t in f.model_types}

# Megatron-style: q/k/v and intermediate split their output features on "tensor", the two projections back to the
# hidden size split their input features, and "fsdp" takes the other dim. Rules end in `$` and are not anchored
# at the start, so they also match optimizer states, whose leaves keep the param path under a prefix.
SHARDING_RULES: tuple[tuple[str, P], ...] = (
    (r"attention/self/(query|key|value)/kernel$", P("fsdp", "tensor")),
    (r"attention/self/(query|key|value)/bias$", P("tensor")),
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate/dense/bias$", P("tensor")),
    (r"attention/output/dense/kernel$", P("tensor", "fsdp")),
    (r"layer/\d+/output/dense/kernel$", P("tensor", "fsdp")),
    # Vocabulary sizes (30522) rarely divide the mesh, so the hidden dim carries the split.
    (r"embeddings/(word|position)_embeddings/embedding$", P(None, "fsdp")),
    # The head's hidden x hidden dense layer (BERT's pooler, RoBERTa's classifier.dense, ...): as large as one
    # attention projection (16.8M parameters in ALBERT-xxlarge), so it is not replicated either.
    (r"pooler/dense/kernel$", P("fsdp")),
)


def decays(path: str) -> bool:
    """HF Trainer's get_decay_parameter_names: every weight but biases and LayerNorm's (embeddings included)."""
    return not (path.endswith("bias") or "LayerNorm" in path)


def describe(cfg: Any, p: dict, length: int) -> Rows:
    """inspect's lines from the inputs to the logits (batch 1, padded length `length`)."""
    b, d, c = cfg.backbone, cfg.backbone.hidden_size, cfg.num_labels
    family = b.family
    flat = flatten_dict(p["bert"])
    emb = count_params([v for k, v in flat.items() if k[0] in ("embeddings", "embeddings_project")])
    enc = count_params([v for k, v in flat.items() if k[0] == "encoder"])
    positions = f"positions {b.max_position_embeddings}" + (" from padding_idx + 1" if family.positions_from_padding
                                                            else "")
    types = f"types {b.type_vocab_size}" if family.token_types else "no token types"
    width = f", width {b.embedding_width} projected to {d}" if b.projects_embeddings else ""
    layers = len(set(b.layer_params()))
    shared = f", {layers} weight set{'s' if layers > 1 else ''} shared" if family.shared_layers else ""
    rows = [
        ("input_ids, attention_mask" + (", token_type_ids" if family.token_types else ""), f"[1, {length}]", ""),
        (f"backbone: {b.model_type}, {b.num_hidden_layers} layers{shared}, hidden {d}, {b.num_attention_heads} heads",
         f"hidden [1, {length}, {d}]", f"{emb + enc:,}"),
        (f"  embeddings (vocab {b.vocab_size}, {positions}, {types}{width})", "", f"{emb:,}"),
        (f"  encoder: {b.num_hidden_layers} x (self-attention + feed-forward {b.intermediate_size})", "", f"{enc:,}"),
        (f"positions: {POSITIONS[cfg.pooling]}", f"[1, {d}]", "0"),
    ]
    dropout = (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0")
    if cfg.pooling == HF_POOLING:
        if family.head_dropout_first:
            rows.append(dropout)
        rows.append((f"{family.hf_module('pooler.dense')}: {family.head_activation}(dense {d} -> {d})", f"[1, {d}]",
                     f"{count_params(p['pooler']):,}"))
    else:
        rows.append((f"{family.hf_module('pooler.dense')}: none (pooling={cfg.pooling!r})", "", "0"))
    rows += [dropout, (f"{family.hf_module('classifier')}: dense {d} -> {c}", f"logits [1, {c}]",
                       f"{count_params(p['classifier']):,}")]
    return rows
