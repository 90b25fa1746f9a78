"""The names that settings, files and outputs share, each defined once (no heavy imports: config reads it)."""

from __future__ import annotations

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

Impl = Literal["fast", "hf"]
IMPLS: tuple[str, ...] = get_args(Impl)

# Texts longer than data.max_length, and how a long text's windows combine into its prediction.
LongText = Literal["truncate", "head_tail", "chunks"]
LONG_TEXTS: tuple[str, ...] = get_args(LongText)
ChunkAggregation = Literal["mean_logits", "max_prob"]
CHUNK_AGGREGATIONS: tuple[str, ...] = get_args(ChunkAggregation)
