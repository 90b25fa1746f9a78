"""DeBERTa-v2 and v3's config as flaxclf reads and writes it: the fields of transformers' DebertaV2Config that fix
the encoder's and the head's math, from and to config.json. v3 is v2's classes with other settings (relative
attention over 256 log buckets, shared attention keys, no absolute positions, no token types)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from flaxclf.models.deberta.family import FAMILY
from flaxclf.models.family import Family
from flaxclf.nn.activations import ACTIVATIONS

POS_ATT_TYPES = ("c2p", "p2c")  # content-to-position and position-to-content; DeBERTa v1's "p2p" is not in v2


@dataclass(frozen=True)
class DebertaV2Spec:
    """The fields of transformers' DebertaV2Config that the math uses; defaults are that class's (and, for the
    keys it reads with getattr, the attention's fallbacks). The label count and the classifier's dropout
    (cls_dropout) belong to flaxclf.models.classifier.ClassifierConfig."""

    vocab_size: int = 128100
    hidden_size: int = 1536
    num_hidden_layers: int = 24
    num_attention_heads: int = 24
    intermediate_size: int = 6144
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-7
    relative_attention: bool = False
    max_relative_positions: int = -1  # < 1: max_position_embeddings
    pad_token_id: int = 0
    position_biased_input: bool = True  # absolute position embeddings added to the input (v3: False)
    pos_att_type: tuple[str, ...] = ()
    pooler_dropout: float = 0.0
    pooler_hidden_act: str = "gelu"
    share_att_key: bool = False  # the relative terms project with query_proj / key_proj (v3: True)
    position_buckets: int = -1  # > 0: relative distances in that many log buckets per side (v3: 256)
    norm_rel_ebd: str = "none"  # "layer_norm": the relative embeddings go through encoder.LayerNorm (v3)
    embedding_size: int | None = None  # None: hidden_size; else a projection embed_proj to it

    def __post_init__(self):
        object.__setattr__(self, "pos_att_type", tuple(self.pos_att_type))
        for key in ("hidden_act", "pooler_hidden_act"):
            if getattr(self, key) not in ACTIVATIONS:
                raise ValueError(f"{key} {getattr(self, key)!r} is not known; use one of {', '.join(ACTIVATIONS)}")
        unknown = [t for t in self.pos_att_type if t not in POS_ATT_TYPES]
        if unknown:
            raise ValueError(f"pos_att_type {'|'.join(unknown)} is not supported; flaxclf's DeBERTa-v2 has "
                             f"{' and '.join(POS_ATT_TYPES)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} does not split into {self.num_attention_heads} heads")
        norms = {x.strip() for x in self.norm_rel_ebd.lower().split("|")} - {"none", "layer_norm", ""}
        if norms:
            raise ValueError(f"norm_rel_ebd {self.norm_rel_ebd!r} is not supported; use 'none' or 'layer_norm'")

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> DebertaV2Spec:
        """From a config.json's fields; a missing key takes DebertaV2Config's default. The settings flaxclf does not
        compute are refused, each in a line that names it."""
        if hf.get("model_type", "deberta-v2") != "deberta-v2":
            raise ValueError(f"model_type {hf['model_type']!r} is not DeBERTa-v2")
        refused = [
            (hf.get("conv_kernel_size", 0) > 0, "conv_kernel_size", "the convolution layer after layer 0 of some "
             "DeBERTa-v2 checkpoints (xlarge, xxlarge) is not implemented"),
            (hf.get("attention_head_size") not in (None, hf.get("hidden_size", 1536) // hf.get(
                "num_attention_heads", 24)), "attention_head_size", "heads must split hidden_size evenly"),
            (hf.get("pooler_hidden_size", hf.get("hidden_size")) != hf.get("hidden_size"), "pooler_hidden_size",
             "the classifier reads a pooler of hidden_size"),
        ]
        for bad, key, why in refused:
            if bad:
                raise ValueError(f"{key}={hf[key]!r} is not supported: {why}")
        known = {f.name for f in fields(cls)}
        out = {k: v for k, v in hf.items() if k in known}
        att = out.get("pos_att_type")
        if isinstance(att, str):  # older configs: "p2c|c2p"
            att = [x.strip() for x in att.lower().split("|")]
        out["pos_att_type"] = tuple(att or ())
        if out.get("embedding_size") == out.get("hidden_size", cls.hidden_size):
            out["embedding_size"] = None
        return cls(**out)

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """config.json's fields, as DebertaV2Config reads them in transformers 4.x and 5.x."""
        out = {**asdict(self), "pos_att_type": list(self.pos_att_type)}
        if self.embedding_size is None:
            del out["embedding_size"]
        return {"model_type": "deberta-v2", **out, **extra}

    @property
    def model_type(self) -> str:
        return "deberta-v2"

    @property
    def family(self) -> Family:
        return FAMILY

    def with_pooling(self, pooling: str) -> tuple[DebertaV2Spec, str]:
        return self, pooling

    def pooling_label(self, pooling: str) -> str:
        return pooling

    @property
    def max_length(self) -> int:
        """The longest input: the absolute position table's rows; relative-only models (v3) were trained to it."""
        return self.max_position_embeddings

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_width(self) -> int:
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    @property
    def rel_layer_norm(self) -> bool:
        return "layer_norm" in {x.strip() for x in self.norm_rel_ebd.lower().split("|")}

    @property
    def max_relative(self) -> int:
        """The largest relative distance told apart (DebertaV2Encoder's max_relative_positions)."""
        return self.max_relative_positions if self.max_relative_positions >= 1 else self.max_position_embeddings

    @property
    def att_span(self) -> int:
        """k: the relative embeddings have 2k rows, for distances bucketed into [-k, k)."""
        return self.position_buckets if self.position_buckets > 0 else self.max_relative

    @property
    def scale_factor(self) -> int:
        """The scores divide by sqrt(head_dim * this): 1 + one per relative term in pos_att_type (counted even
        with relative_attention off, as transformers does)."""
        return 1 + len(self.pos_att_type)

    def relative_index(self, length: int) -> np.ndarray:
        """[2 * length - 1] int: the row of the relative embeddings that distance i - j = d - (length - 1) reads,
        clamp(bucket(i - j) + k, 0, 2k - 1); a constant of the static length, computed once at trace time."""
        rel = np.arange(-(length - 1), length, dtype=np.int64)
        if self.position_buckets > 0:
            rel = log_bucket(rel, self.position_buckets, self.max_relative)
        k = self.att_span
        return np.clip(rel + k, 0, 2 * k - 1)


def log_bucket(rel: np.ndarray, bucket_size: int, max_position: int) -> np.ndarray:
    """transformers' make_log_bucket_position, in float32 as torch computes it: distances within bucket_size // 2
    stay as they are, longer ones share logarithmically wider buckets up to max_position."""
    sign = np.sign(rel)
    mid = bucket_size // 2
    abs_pos = np.where((rel < mid) & (rel > -mid), mid - 1, np.abs(rel))
    ratio = np.float32(np.log(np.float32((max_position - 1) / mid)))
    log_pos = np.ceil(np.log((abs_pos / np.float32(mid)).astype(np.float32)) / ratio * np.float32(mid - 1)) + mid
    return np.where(abs_pos <= mid, rel, log_pos * sign).astype(np.int64)
