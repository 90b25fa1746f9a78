"""ModernBERT's config as flaxclf reads and writes it: the fields of transformers' ModernBertConfig that fix the
encoder's and the head's math, from and to config.json (transformers 4.x and 5.x spellings alike)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

from flaxclf.models.family import Family
from flaxclf.models.modernbert.family import FAMILY
from flaxclf.nn.activations import ACTIVATIONS
from flaxclf.options import HF_POOLING

ClassifierPooling = Literal["cls", "mean"]
LocalImpl = Literal["auto", "banded", "dense"]


@dataclass(frozen=True)
class AttentionImpl:
    """How the attention is computed (the math is the same either way)."""

    local: LocalImpl = "auto"  # local layers: banded when L > 3 * window (auto), or always banded / dense
    global_chunk: int = 512  # global layers: queries per block, chunked when L is longer (0: [L, L] at once)




@dataclass(frozen=True)
class ModernBertSpec:
    """The fields of transformers' ModernBertConfig that fix the encoder's and the head's math; defaults are that
    class's. The label count and the classifier's dropout belong to flaxclf.models.classifier.ClassifierConfig, as
    BERT's do."""

    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_hidden_layers: int = 22
    num_attention_heads: int = 12
    max_position_embeddings: int = 8192
    global_rope_theta: float = 160000.0
    local_rope_theta: float | None = 10000.0  # None: global_rope_theta (as transformers 4.x)
    global_attn_every_n_layers: int = 3
    local_attention: int = 128  # the full window width; each side sees local_attention // 2
    norm_eps: float = 1e-5
    norm_bias: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    classifier_bias: bool = False  # head.dense's bias; the classifier itself always has one
    classifier_pooling: ClassifierPooling = "cls"
    classifier_activation: str = "gelu"
    hidden_activation: str = "gelu"
    embedding_dropout: float = 0.0
    attention_dropout: float = 0.0
    mlp_dropout: float = 0.0
    pad_token_id: int = 50283
    initializer_range: float = 0.02
    initializer_cutoff_factor: float = 2.0

    def __post_init__(self):
        if self.classifier_pooling not in ("cls", "mean"):
            raise ValueError(f"classifier_pooling {self.classifier_pooling!r} is not known; use 'cls' or 'mean'")
        for key in ("hidden_activation", "classifier_activation"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ValueError(f"{key} {getattr(self, key)!r} is not known; use one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"hidden_size {self.hidden_size} must split into {self.num_attention_heads} heads of "
                             "an even size (rotary embeddings rotate pairs)")
        if self.global_attn_every_n_layers < 1 or self.local_attention < 0:
            raise ValueError("global_attn_every_n_layers must be >= 1 and local_attention >= 0, got "
                             f"{self.global_attn_every_n_layers}, {self.local_attention}")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> ModernBertSpec:
        """From a config.json's fields, as transformers 4.x writes them (global_rope_theta, local_rope_theta,
        global_attn_every_n_layers) or 5.x does (rope_parameters per layer type, layer_types); a missing key takes
        ModernBertConfig's default. Rotary scaling and layer patterns other than every-n-th-global are refused."""
        if hf.get("model_type", "modernbert") != "modernbert":
            raise ValueError(f"model_type {hf['model_type']!r} is not ModernBERT")
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in hf.items() if k in known}
        if hf.get("rope_scaling"):
            raise ValueError(f"rope_scaling {hf['rope_scaling']!r} is not supported; flaxclf's ModernBERT has the "
                             "default rotary embeddings only")
        for layer_type, key in (("full_attention", "global_rope_theta"), ("sliding_attention", "local_rope_theta")):
            rope = (hf.get("rope_parameters") or {}).get(layer_type) or {}
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"rope_parameters[{layer_type!r}] {rope!r} is not supported; flaxclf's ModernBERT "
                                 "has the default rotary embeddings only")
            if "rope_theta" in rope:
                out[key] = rope["rope_theta"]
        types = hf.get("layer_types")
        if types:
            n = types[1:].index("full_attention") + 1 if "full_attention" in types[1:] else len(types)
            if list(types) != _layer_types(len(types), n):
                raise ValueError(f"layer_types {types} is not supported; flaxclf's ModernBERT has a global layer "
                                 "every n layers (global_attn_every_n_layers), starting at layer 0")
            out["global_attn_every_n_layers"] = n
        return cls(**out)

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """config.json's fields for this spec, which ModernBertConfig reads in transformers 4.x and 5.x alike (5.x
        turns the rope thetas and global_attn_every_n_layers into its rope_parameters and layer_types)."""
        return {"model_type": "modernbert", **asdict(self), **extra}

    @property
    def model_type(self) -> str:
        return "modernbert"

    @property
    def family(self) -> Family:
        return FAMILY

    def with_pooling(self, pooling: str) -> tuple[ModernBertSpec, str]:
        """ModernBERT's own head pools by classifier_pooling, cls or mean, and PyTorch's class has both: a pooling
        asked for goes into the spec (and so into an export's config.json), and the head stays the family's."""
        if pooling == HF_POOLING:
            return self, pooling
        if pooling not in ("cls", "mean"):
            raise ValueError(f"pooling {pooling!r} is not one of ModernBERT's; use cls, mean or {HF_POOLING} (the "
                             "checkpoint's classifier_pooling)")
        return replace(self, classifier_pooling=pooling), HF_POOLING

    def pooling_label(self, pooling: str) -> str:
        return f"{self.classifier_pooling} (ModernBERT's classifier_pooling)"

    @property
    def max_length(self) -> int:
        """The longest input: rotary positions have no table, but the checkpoint was trained up to this."""
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def window(self) -> int:
        """How far a local layer's query sees on each side: |i - j| <= window."""
        return self.local_attention // 2

    def is_global(self, layer_id: int) -> bool:
        return layer_id % self.global_attn_every_n_layers == 0

    def rope_theta(self, layer_id: int) -> float:
        if self.is_global(layer_id) or self.local_rope_theta is None:
            return self.global_rope_theta
        return self.local_rope_theta


def _layer_types(layers: int, every: int) -> list[str]:
    """transformers 5.x's layer_types for a global layer every `every` layers."""
    return ["sliding_attention" if i % every else "full_attention" for i in range(layers)]
