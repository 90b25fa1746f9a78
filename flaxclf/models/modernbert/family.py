"""ModernBERT as a family: its names at the Hugging Face boundary (its tree is PyTorch's, so nothing is renamed),
its sharding rules, decay mask and inspect's lines."""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

from flaxclf.models.family import Family
from flaxclf.models.interface import POSITIONS, Rows, count_params

FAMILY = Family(
    name="modernbert", architectures={"modernbert": "ModernBertForSequenceClassification"}, prefix="model",
    encoder="modernbert", token_types=False, head_is_new=True, head_path="head",
    head_names="head (classifier_pooling cls or mean -> dense -> activation -> norm)",
    classifier_dropout_default=0.0,
    lora_targets=("Wqkv",),  # peft adapts the fused projection whole
    names=(("model.", "model."), ("head.", "head."), ("classifier.", "classifier.")),
    # ModernBertForMaskedLM's decoder; its `head` is the classifier's own prediction head, and is kept.
    ignored=("decoder.",))

# As BERT's (flaxclf.models.bert.families): the fused Wqkv and the GeGLU's Wi split their outputs on "tensor", the
# two Wo their inputs; the vocabulary (50368) splits by the hidden dim.
SHARDING_RULES: tuple[tuple[str, P], ...] = (
    (r"attn/Wqkv/kernel$", P("fsdp", "tensor")),
    (r"attn/Wqkv/bias$", P("tensor")),
    (r"mlp/Wi/kernel$", P("fsdp", "tensor")),
    (r"mlp/Wi/bias$", P("tensor")),
    (r"(attn|mlp)/Wo/kernel$", P("tensor", "fsdp")),
    (r"tok_embeddings/embedding$", P(None, "fsdp")),
    (r"head/dense/kernel$", P("fsdp")),
)


def decays(path: str) -> bool:
    """HF Trainer's rule (no decay for biases and LayerNorms) on ModernBERT's names: its norms (norm, attn_norm,
    mlp_norm, final_norm, head/norm) have a scale and, with norm_bias, a bias."""
    return not path.endswith(("bias", "scale"))


def describe(cfg: Any, p: dict, length: int) -> Rows:
    """inspect's lines from the inputs to the logits (batch 1, padded length `length`)."""
    b, d, c = cfg.backbone, cfg.backbone.hidden_size, cfg.num_labels
    every = b.global_attn_every_n_layers
    glob = sum(b.is_global(i) for i in range(b.num_hidden_layers))
    local_theta = b.global_rope_theta if b.local_rope_theta is None else b.local_rope_theta
    return [
        ("input_ids, attention_mask", f"[1, {length}]", ""),
        (f"backbone: modernbert, {b.num_hidden_layers} layers, hidden {d}, {b.num_attention_heads} heads",
         f"hidden [1, {length}, {d}]", f"{count_params(p['model']):,}"),
        (f"  embeddings (vocab {b.vocab_size}, no positions: rotary; no token types) + norm", "",
         f"{count_params(p['model']['embeddings']):,}"),
        (f"  encoder: {glob} global layers (every {every}, rotary theta {b.global_rope_theta:g}) and "
         f"{b.num_hidden_layers - glob} local (window +-{b.window}, theta {local_theta:g})"
         f", GeGLU {b.intermediate_size}; final norm", "", ""),
        (f"positions: {POSITIONS[b.classifier_pooling]}", f"[1, {d}]", "0"),
        (f"head: norm({b.classifier_activation}(dense {d} -> {d}))", f"[1, {d}]", f"{count_params(p['head']):,}"),
        (f"dropout: p={cfg.dropout_rate:g} (training only)", f"[1, {d}]", "0"),
        (f"classifier: dense {d} -> {c}", f"logits [1, {c}]", f"{count_params(p['classifier']):,}"),
    ]
