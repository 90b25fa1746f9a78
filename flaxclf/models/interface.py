"""What every encoder folder under flaxclf.models provides: a spec (its config.json fields), a classifier module,
and an Encoder entry that flaxclf.models.registry lists. Code outside a folder reaches an encoder through these
and nothing else: no isinstance on a spec class, no table keyed by a family's name."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import jax
import numpy as np

from flaxclf.models.family import Family

if TYPE_CHECKING:
    from jax.sharding import PartitionSpec

    from flaxclf.models.classifier import ClassifierConfig


class EncoderSpec(Protocol):
    """An encoder's shape and regularization: the fields of its config.json that the math uses (a frozen
    dataclass: equal specs build equal modules, and compiled steps are cached by it)."""

    model_type: str
    hidden_size: int
    initializer_range: float
    pad_token_id: int

    @property
    def family(self) -> Family: ...

    @property
    def max_length(self) -> int:
        """The longest input its position embeddings (or training) allow."""

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any]) -> EncoderSpec: ...

    def to_hf(self, **extra: Any) -> dict[str, Any]:
        """config.json's fields for this spec, plus `extra`."""

    def with_pooling(self, pooling: str) -> tuple[EncoderSpec, str]:
        """(spec, pooling) for a classifier asked to pool by `pooling`: an encoder whose head pools by a setting of
        its own (ModernBERT's classifier_pooling) takes it into the spec."""

    def pooling_label(self, pooling: str) -> str:
        """The pooling as the user knows it, for inspect's table."""


class Classifier(Protocol):
    """A Flax module that classifies: logits [B, num_labels] in fp32 whatever the compute dtype. Families without
    token types accept token_type_ids and ignore them (every batch carries them). With segments=S the rows are
    packed (flaxclf.nn.segments: attention_mask holds each token's text, 1..S) and the logits are [B, S,
    num_labels], each text's own: what it gives alone in a row."""

    config: ClassifierConfig
    dtype: Any
    remat: bool
    impl: str

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None, *,
                 deterministic: bool = True, segments: int | None = None) -> jax.Array: ...

    def encode(self, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None, *,
               deterministic: bool = True) -> jax.Array:
        """The final hidden states [B, L, D], every position."""

    def classify(self, hidden_BxLxD: jax.Array, attention_mask: jax.Array, *, deterministic: bool = True,
                 ) -> jax.Array:
        """From final hidden states to the logits."""


Rows = list[tuple[str, str, str]]  # inspect's architecture lines: (what, output shape, parameter count)

# inspect's line for what a pooling hands the head, by model.pooling (ModernBERT's classifier_pooling: cls, mean).
POSITIONS = {
    "cls_pooler": "h[:, 0]: position 0 ([CLS]) only",
    "cls": "h[:, 0]: position 0 ([CLS]) only",
    "mean": "masked mean over every non-pad position",
    "max": "masked max over every non-pad position",
}


def count_params(tree: Any) -> int:
    """The number of parameters in a tree (or list) of arrays."""
    return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


@dataclass(frozen=True)
class Encoder:
    """One encoder folder, as the rest of flaxclf sees it."""

    name: str  # the folder's name, and Family.encoder of its families
    families: tuple[Family, ...]
    spec_class: type
    # The Flax module of a ClassifierConfig: (config, dtype, remat, impl) -> Classifier.
    make: Callable[..., Classifier]
    # (regex searched in the "/"-joined parameter path, PartitionSpec), first match wins (flaxclf.runtime.sharding).
    sharding_rules: tuple[tuple[str, PartitionSpec], ...]
    # Whether the parameter at a "/"-joined path takes weight decay (HF Trainer: all but biases and norms).
    decays: Callable[[str], bool]
    # inspect's lines between the inputs and the logits: (config, params["params"], padded length) -> Rows.
    describe: Callable[[ClassifierConfig, dict, int], Rows]
