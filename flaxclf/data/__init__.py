"""Files -> examples -> tokenized, bucketed, host-sharded global batches.

One module per step: readers (files -> tables; also predict's input texts), labels (tables -> checked rows and
label arrays), tokens (texts -> token ids, cached), batches (tokenized rows -> global batches, host sharding),
load (data.* settings -> Task and tokenized splits), types (what they hand each other), packing (texts sharing rows,
told apart by segment ids).
"""

from flaxclf.data.batches import (
    FIELDS,
    TrainBatches,
    batch_structs,
    bucket_lengths,
    eval_batch_counts,
    eval_batches,
    eval_lengths,
    eval_plan,
    eval_structs,
    host_rows,
    local_batch_size,
    packed_eval_plan,
    train_batch_counts,
    train_epoch_plan,
)
from flaxclf.data.load import load_task
from flaxclf.data.readers import read_texts
from flaxclf.data.tokens import load_tokenizer, tokenizer_hash
from flaxclf.data.types import SPLITS, DataError, Task, TokenizedSplit
from flaxclf.options import MULTI, REGRESSION, SINGLE

__all__ = ["FIELDS", "MULTI", "REGRESSION", "SINGLE", "SPLITS", "DataError", "Task", "TokenizedSplit",
           "TrainBatches", "batch_structs", "bucket_lengths", "eval_batch_counts", "eval_batches", "eval_lengths",
           "eval_plan", "eval_structs", "host_rows",
           "load_task", "load_tokenizer", "local_batch_size", "packed_eval_plan", "read_texts", "tokenizer_hash",
           "train_batch_counts", "train_epoch_plan"]
