"""A family: what a transformers *ForSequenceClassification does differently from the encoder that computes it,
as data, and the map between its state-dict names and flaxclf's parameter tree.

Each encoder folder (flaxclf.models.bert, flaxclf.models.modernbert) lists its families; flaxclf.models.registry
collects them. What a family may change:
  * embeddings: token types or none, positions counted from padding_idx + 1 (RoBERTa), a factorized embedding
    size with a projection to the hidden size (ELECTRA when they differ, ALBERT always);
  * layers: which dropouts follow the attention and feed-forward outputs, and which weights each layer position
    uses (ALBERT shares one layer's weights across positions);
  * head: the dense layer on position 0 (BERT's pooler, RoBERTa's classifier.dense, DistilBERT's pre_classifier),
    its activation, and whether a dropout comes before it;
  * names: config.json's keys and the state dict's module names, mapped onto the encoder's parameter tree.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from flaxclf.options import IMPLS


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
    # Canonical module prefixes a checkpoint may carry that a model of the family may not read (DeBERTa-v3's
    # unused position table): dropped on load where the model has no such weight, refused nowhere.
    unused_weights: tuple[str, ...] = ()
    # The encoder that computes it: the name of its folder under flaxclf.models.
    encoder: str = "bert"
    impls: tuple[str, ...] = ("fast",)  # model.impl values that compute it ("hf": transformers' FlaxBertModule)
    head_path: str = "pooler"  # the head's dense layer(s) before the classifier, in flaxclf's tree
    # model.lora.targets' default, in the state dict's module names: peft's own default where it has one
    # (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING), else the same query and value projections.
    lora_targets: tuple[str, ...] = ("query", "value")

    def hf_key(self, spec_field: str) -> str:
        return self.config_keys.get(spec_field, spec_field)

    def defaults_for(self, model_type: str) -> dict[str, Any]:
        """What transformers' config class for model_type gives a field that config.json leaves out, where BERT's
        default differs."""
        return {**self.defaults, **self.model_type_defaults.get(model_type, {})}

    @property
    def model_types(self) -> tuple[str, ...]:
        return tuple(self.architectures)

    def check_impl(self, impl: str) -> None:
        """model.impl must be known, and one that computes this family (impl=hf, transformers' FlaxBertModule,
        computes the bert family alone)."""
        if impl not in IMPLS:
            raise ValueError(f"impl {impl!r} is not known; use one of {', '.join(IMPLS)}")
        if impl not in self.impls:
            raise ValueError(f"model.impl={impl} is transformers' FlaxBertModule, for BERT; a {self.name} model "
                             f"needs model.impl={self.impls[0]}")

    def to_canonical(self, hf_name: str) -> str | None:
        """A state-dict name (with or without the base model's prefix) in canonical dotted form; None if unknown."""
        out = rename(hf_name, self.names)
        if out is None and not hf_name.startswith(self.prefix + "."):
            out = rename(f"{self.prefix}.{hf_name}", self.names)
        return out

    def to_hf(self, canonical: str) -> str:
        out = rename(canonical, tuple((dst, src) for src, dst in self.names))
        if out is None:
            raise KeyError(f"{canonical} has no {self.name} name")
        return out

    def is_ignored(self, hf_name: str) -> bool:
        """Buffers (position_ids, token_type_ids) and other tasks' heads are not weights of a classifier. A base
        model's checkpoint names its weights without the prefix (RobertaModel's pooler.dense.weight)."""
        names = (hf_name, f"{self.prefix}.{hf_name}")
        return (hf_name.endswith(("position_ids", "token_type_ids"))
                or any(n.startswith(p) for n in names for p in self.ignored))

    def is_unused(self, canonical: str) -> bool:
        """Whether a canonical name is a weight the family's checkpoints may carry and its model may not read."""
        return canonical.startswith(self.unused_weights)  # False for none

    def hf_module(self, canonical: str) -> str:
        """A canonical module's name in the family's PyTorch class, without the base model's prefix."""
        name = self.to_hf(canonical + ".weight").removesuffix(".weight").removeprefix(self.prefix + ".")
        return "pooler" if name == "pooler.dense" else name


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
