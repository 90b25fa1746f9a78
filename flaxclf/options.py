"""The option values that settings, files and outputs share, each defined once, and which of them this
environment can run (no heavy imports: config reads it)."""

from __future__ import annotations

import importlib.metadata
from typing import Literal, get_args

Pooling = Literal["cls_pooler", "cls", "mean", "max"]
POOLINGS: tuple[str, ...] = get_args(Pooling)
CLS_POOLINGS: tuple[str, ...] = ("cls_pooler", "cls")  # the ones that read position 0 alone
HF_POOLING = "cls_pooler"  # the only head PyTorch's BertForSequenceClassification has (export needs it)

ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]
PROBLEM_TYPES: tuple[str, ...] = get_args(ProblemType)
SINGLE, MULTI, REGRESSION = PROBLEM_TYPES

# Data files: the formats data.format and --format accept, and the extensions that imply one.
FileFormat = Literal["csv", "tsv", "jsonl", "parquet", "hf_disk"]
FILE_FORMATS: tuple[str, ...] = get_args(FileFormat)
EXTENSIONS: dict[str, str] = {".csv": "csv", ".tsv": "tsv", ".jsonl": "jsonl", ".json": "jsonl",
                              ".parquet": "parquet", ".pq": "parquet"}

# Inputs of `flaxclf predict`: a data file format, or plain lines (one text a line).
InputFormat = Literal["lines", "csv", "tsv", "jsonl", "parquet"]
INPUT_FORMATS: tuple[str, ...] = get_args(InputFormat)

# model.impl: "fast" is flaxclf's own encoder; "hf" is transformers' FlaxBertModule, for the bert family only.
Impl = Literal["fast", "hf"]
IMPLS: tuple[str, ...] = get_args(Impl)

# The last transformers line with Flax BERT (model.impl=hf, the reference the fast encoder is tested against).
HF_FLAX_MAJOR = 4


def transformers_version() -> str | None:
    """The installed transformers' version, read without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def hf_flax_problem() -> str | None:
    """Why transformers' FlaxBertModule can't be used here, in one sentence; None when it can."""
    version = transformers_version()
    if version is None:
        return "model.impl=hf needs transformers 4.x (its Flax BERT); it is not installed: use model.impl=fast"
    if int(version.split(".")[0]) > HF_FLAX_MAJOR:
        return (f"model.impl=hf needs transformers 4.x (Flax was removed in v5.0) but {version} is installed; use "
                "model.impl=fast, or pip install 'transformers<5'")
    return None


# Texts longer than data.max_length, and how a long text's windows combine into its prediction.
LongText = Literal["truncate", "head_tail", "chunks"]
LONG_TEXTS: tuple[str, ...] = get_args(LongText)
ChunkAggregation = Literal["mean_logits", "max_prob"]
CHUNK_AGGREGATIONS: tuple[str, ...] = get_args(ChunkAggregation)
