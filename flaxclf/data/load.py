"""data.* settings -> the Task and this process's tokenized splits.

The rows come from a packaged task (``data.task``, see flaxclf.assets) or from user files (``data.train_file``
and optional validation/test files; the files win when both are set). Texts come from ``text_column`` (and
``text_pair_column`` for pairs), labels from ``label_column``. Every process reads and checks every row, then
tokenizes only its share (flaxclf.data.batches says which).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from flaxclf import assets
from flaxclf.config import DataConfig
from flaxclf.data import batches, labels, readers, tokens
from flaxclf.data.long_text import LongText
from flaxclf.data.types import SPLITS, DataError, Task, TokenizedSplit


def _split_tables(cfg: DataConfig, say: Callable[[str], None],
                  ) -> tuple[dict[str, readers.Table], labels.Columns, list | None]:
    """The tables of the splits present, the columns to use, and the fixed label order of a packaged task."""
    if cfg.train_file is None:
        if cfg.task is None:
            raise DataError("data.task is null and no data.train_file is given: name a packaged task or a file")
        try:
            path = assets.resolve_task(cfg.task)
        except assets.AssetError as e:
            raise DataError(str(e)) from None
        cols = labels.Columns("text", None, "label", "string", cfg.empty_text)
        return readers.read_rt_snippets(path, say), cols, list(readers.RT_LABELS)
    cols = labels.Columns(cfg.text_column, cfg.text_pair_column, cfg.label_column, cfg.label_type, cfg.empty_text)
    files = {s: getattr(cfg, f"{s}_file") for s in SPLITS if getattr(cfg, f"{s}_file") is not None}
    for s, f in files.items():  # every path is checked before any file is read
        if not Path(f).expanduser().exists():
            raise DataError(f"data.{s}_file: {f} does not exist; check the path")
    tables = {s: readers.read_table(Path(f).expanduser(), cfg.format, s, cols.names()) for s, f in files.items()}
    return tables, cols, None


def _printer(process_index: int) -> Callable[[str], None]:
    def say(msg: str) -> None:
        if process_index == 0:
            print(f"flaxclf.data: {msg}", flush=True)

    return say


def load_task(cfg: DataConfig, model_dir: Path, process_index: int | None = None,
              process_count: int | None = None, *, train_batch_size: int | None = None,
              max_positions: int | None = None) -> tuple[Task, dict[str, TokenizedSplit]]:
    """Reads, checks and labels every split, then tokenizes (or loads from the cache) this process's share.

    Returns the Task and the splits present among train/validation/test. process_index/process_count
    default to jax's; pass them to load one host's share explicitly. train_batch_size (the global batch size)
    shards the train split into batch slots, as TrainBatches needs on more than one process; None shares it
    as rows i % process_count. max_positions, the longest input the model takes (flaxclf.hf.config.max_positions),
    refuses a longer data.max_length before any file is read.
    """
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count
    if train_batch_size is not None and (train_batch_size < 1 or train_batch_size % pc):
        raise DataError(f"train.global_batch_size {train_batch_size} does not divide over {pc} processes; use a "
                        f"positive multiple of {pc}")
    model_dir = Path(model_dir)
    limit = max_positions
    if limit is not None and cfg.max_length > limit:
        raise DataError(f"data.max_length {cfg.max_length} is above the {limit} tokens the model's position "
                        f"embeddings hold ({model_dir / 'config.json'}); use data.max_length <= {limit}")
    say = _printer(pi)
    tables, cols, fixed = _split_tables(cfg, say)
    rows = {s: labels.select_rows(t, cols, say) for s, t in tables.items()}
    task, label_arrays = labels.encode_labels(rows, cols.label_type, fixed)
    task.train_labels = label_arrays.get("train")
    tok = tokens.load_tokenizer(model_dir, cfg.max_length)
    tok_hash = tokens.tokenizer_hash(model_dir)
    cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else assets.cache_root() / "tokenized"
    spec = long_text_spec(cfg)
    splits = {}
    for s, r in rows.items():
        slots = train_batch_size if s == "train" else None
        mine = batches.host_rows(len(r.keep), pi, pc, slots)
        texts = [r.texts[i] for i in mine]
        pairs = [r.pairs[i] for i in mine] if r.pairs is not None else None
        arrays, hit = tokens.tokenize_cached(tok, tok_hash, texts, pairs, spec, cache_dir, s)
        doc = arrays["doc"]
        splits[s] = TokenizedSplit(s, arrays["input_ids"], arrays["token_type_ids"], arrays["offsets"],
                                   label_arrays[s][mine][doc], mine[doc], len(r.keep), cfg.max_length, pi, pc,
                                   hit, slots, chunked=spec.mode == "chunks", packing_length=cfg.packing_length)
        report = length_report(s, arrays["full_lengths"], len(doc), spec, limit, pc == jax.process_count())
        if report:
            say(report)
    return task, splits


def long_text_spec(cfg: DataConfig) -> LongText:
    return LongText(cfg.long_text, cfg.max_length, cfg.stride, cfg.head_tokens)


def _gather(local: np.ndarray) -> np.ndarray:
    """Every process's 1-D int array, concatenated (process_allgather needs equal shapes: pad with -1)."""
    from jax.experimental import multihost_utils

    n = np.asarray(multihost_utils.process_allgather(np.array([len(local)], np.int64))).reshape(-1)
    padded = np.full(int(n.max()), -1, np.int64)
    padded[:len(local)] = local
    out = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(n), -1)
    return np.concatenate([row[:k] for row, k in zip(out, n, strict=True)])


def length_report(split: str, full_lengths: np.ndarray, rows: int, spec: LongText, limit: int | None,
                  everyone: bool) -> str | None:
    """One line on the texts longer than max_length (over all processes when `everyone`), with a suggestion
    when many are cut; None when none is longer."""
    if everyone and jax.process_count() > 1:
        full_lengths = _gather(full_lengths)
        rows = int(_gather(np.array([rows], np.int64)).sum())
    over = full_lengths[full_lengths > spec.max_length] - spec.max_length
    if over.size == 0:
        return None
    n = full_lengths.size
    line = (f"{split}: {over.size} of {n} texts ({over.size / n:.1%}) are longer than data.max_length "
            f"{spec.max_length} tokens, by a median of {int(np.median(over))} and a p95 of "
            f"{int(np.percentile(over, 95))} tokens; ")
    if spec.mode == "chunks":
        return line + f"data.long_text=chunks reads them whole as {rows} windows"
    line += ("their first tokens are kept" if spec.mode == "truncate"
             else "their first and last tokens are kept (data.long_text=head_tail)")
    if spec.mode == "truncate" and over.size >= 0.1 * n:
        room = f" (the model takes up to {limit})" if limit and limit > spec.max_length else ""
        line += (f"; to read more of them, set data.long_text=head_tail or chunks, or raise data.max_length"
                 f"{room}")
    return line
