"""DeBERTa-v2 (and v3) as a family: its names at the Hugging Face boundary (its tree is PyTorch's, so nothing is
renamed), its sharding rules, decay mask and inspect's lines."""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

from flaxclf.models.family import Family
from flaxclf.models.interface import POSITIONS, Rows, count_params

FAMILY = Family(
    name="deberta-v2", architectures={"deberta-v2": "DebertaV2ForSequenceClassification"}, prefix="deberta",
    encoder="deberta", head_is_new=True, head_path="pooler", head_activation="gelu",
    head_names="pooler (ContextPooler: dropout -> dense -> pooler_hidden_act on h[:, 0])",
    classifier_dropout_key="cls_dropout",
    lora_targets=("query_proj", "value_proj"),
    names=(("deberta.", "deberta."), ("pooler.", "pooler."), ("classifier.", "classifier.")),
    # DebertaV2ForMaskedLM's heads (lm_predictions; cls with legacy=True); the replaced-token detector of v3's
    # ELECTRA-style pretraining (mask_predictions).
    ignored=("lm_predictions.", "cls.", "mask_predictions.", "lm_head."),
    # v3's checkpoints carry a position table that position_biased_input=False never reads (transformers ignores
    # it on load too).
    unused_weights=("deberta.embeddings.position_embeddings",))

# As BERT's: query/key/value (and the relative projections) split their outputs on "tensor", the output dense
# its inputs; the vocabulary (128k) splits by the hidden dim.
SHARDING_RULES: tuple[tuple[str, P], ...] = (
    (r"self/(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)/kernel$", P("fsdp", "tensor")),
    (r"self/(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)/bias$", P("tensor")),
    (r"intermediate/dense/kernel$", P("fsdp", "tensor")),
    (r"intermediate/dense/bias$", P("tensor")),
    (r"(attention/output|layer/\d+/output)/dense/kernel$", P("tensor", "fsdp")),
    (r"word_embeddings/embedding$", P(None, "fsdp")),
    (r"(rel_embeddings|position_embeddings)/embedding$", P(None, "fsdp")),
    (r"embed_proj/kernel$", P(None, "fsdp")),
    (r"pooler/dense/kernel$", P("fsdp")),
)


def decays(path: str) -> bool:
    """HF Trainer's rule: no decay for biases and LayerNorms (their scale)."""
    return not path.endswith(("bias", "scale"))


def describe(cfg: Any, p: dict, length: int) -> Rows:
    """inspect's lines from the inputs to the logits (batch 1, padded length `length`)."""
    b, d, c = cfg.backbone, cfg.backbone.hidden_size, cfg.num_labels
    emb = p["deberta"]["embeddings"]
    inputs = ["word"] + (["position"] if b.position_biased_input else []) + \
        (["token type"] if b.type_vocab_size > 0 else [])
    if b.relative_attention:
        buckets = (f"{b.position_buckets} log buckets a side up to {b.max_relative}" if b.position_buckets > 0
                   else f"distances up to {b.max_relative}")
        rel = (f"disentangled attention ({', '.join(b.pos_att_type) or 'content only'}; {buckets}"
               f"{'; shared keys' if b.share_att_key else ''})")
    else:
        rel = "content-only attention"
    rows = [
        ("input_ids, attention_mask", f"[1, {length}]", ""),
        (f"backbone: deberta-v2, {b.num_hidden_layers} layers, hidden {d}, {b.num_attention_heads} heads",
         f"hidden [1, {length}, {d}]", f"{count_params(p['deberta']):,}"),
        (f"  embeddings ({' + '.join(inputs)}) + LayerNorm, zero on padding", "", f"{count_params(emb):,}"),
        (f"  encoder: {rel}, feed-forward {b.intermediate_size}", "", f"{count_params(p['deberta']['encoder']):,}"),
    ]
    if cfg.pooling == "cls_pooler":
        return rows + [
            (f"positions: {POSITIONS['cls_pooler']}", f"[1, {d}]", "0"),
            (f"pooler (ContextPooler): dropout p={b.pooler_dropout:g}, dense {d} -> {d}, {b.pooler_hidden_act}",
             f"[1, {d}]", f"{count_params(p['pooler']):,}"),
            (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0"),
            (f"classifier: dense {d} -> {c}", f"logits [1, {c}]", f"{count_params(p['classifier']):,}"),
        ]
    return rows + [
        (f"positions: {POSITIONS[cfg.pooling]}", f"[1, {d}]", "0"),
        (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0"),
        (f"classifier: dense {d} -> {c}", f"logits [1, {c}]", f"{count_params(p['classifier']):,}"),
    ]
