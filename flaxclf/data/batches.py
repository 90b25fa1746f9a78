"""Tokenized rows -> bucketed, host-sharded global batches, for training and for evaluation.

Multi-host. Every process reads and filters the whole file (so all agree on the labels), then tokenizes and
counts only its share of rows (``i`` is a row's index among all kept rows of its split; see host_rows). Training
rows sit in B = global batch size fixed *slots*: row i belongs to slot ``i % B`` and process p owns the slot block
``[p * B/P, (p + 1) * B/P)`` (P processes; P must divide B), which is exactly its block of every global batch.
Evaluation splits are shared as rows ``i % P == p``: their order doesn't matter, only that each row is seen once.

Batches. Every batch is padded to one of a few lengths (the configured buckets clipped to max_length, plus
max_length), so XLA compiles at most ``len(bucket_lengths)`` shapes per step function. Training batches depend
only on (data, B, buckets, seed, epoch), never on the process count, so a pod run sees the same global batches,
row for row and position for position, as a single-host run. Each epoch, each slot's rows of each bucket are
shuffled by (seed, epoch, slot); bucket k has n_k batches, the fewest rows any slot has for it, and global batch
j of bucket k is row j of every slot, in slot order. A slot's rows beyond n_k are promoted to bucket k + 1
(padded longer) rather than dropped, so an epoch has ``N // B`` steps and leaves out only ``N % B`` rows (the
last bucket's leftovers: a different few each epoch). The order of the epoch's batches over buckets is
shuffled by (seed, epoch). Evaluation sees every row exactly once: the last batch of a bucket is filled with
rows of ``weight`` 0.

Packing (flaxclf.data.packing): training draws the same batches with one bucket (max_length) and packs each batch's
texts into rows of row_length(split) tokens; evaluation packs the whole split and cuts the rows into batches of
about the batch size's texts.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from flaxclf.data import packing
from flaxclf.data.types import DataError, TokenizedSplit

FIELDS = ("input_ids", "attention_mask", "token_type_ids", "labels", "weight")


def host_rows(num_rows: int, process_index: int, process_count: int, batch_slots: int | None) -> np.ndarray:
    """This process's rows: its slot block of every global batch of `batch_slots` rows, or rows i % P."""
    if batch_slots is None:
        return np.arange(process_index, num_rows, process_count, dtype=np.int64)
    per = batch_slots // process_count
    i = np.arange(num_rows, dtype=np.int64)
    return i[(i % batch_slots) // per == process_index]


def bucket_lengths(buckets: Sequence[int], max_length: int) -> list[int]:
    """The padded lengths batches use: the buckets clipped to max_length, plus max_length, sorted."""
    return sorted({min(int(b), max_length) for b in buckets} | {max_length})


def _bucket_members(split: TokenizedSplit, lengths: list[int]) -> list[np.ndarray]:
    """Row indices of each bucket (the smallest padded length that holds the row), in row order."""
    which = np.searchsorted(np.asarray(lengths), split.lengths, side="left")
    return [np.flatnonzero(which == k) for k in range(len(lengths))]


def _allgather_counts(local: np.ndarray) -> np.ndarray:
    """[process_count, K] counts from every process's [K] counts (one process: its own, as [1, K])."""
    gathered = multihost_utils.process_allgather(np.asarray(local, np.int64))
    return np.asarray(gathered).reshape(-1, len(local))


def _slot_members(split: TokenizedSplit, global_batch: int, lengths: list[int]) -> list[list[np.ndarray]]:
    """Local row indices of each of this process's slots (outer) in each bucket (inner), in row order."""
    per = global_batch // split.process_count
    slot = split.rows % global_batch - split.process_index * per
    key = slot * len(lengths) + np.searchsorted(np.asarray(lengths), split.lengths, side="left")
    groups = np.split(np.argsort(key, kind="stable"), np.cumsum(np.bincount(key, minlength=per * len(lengths)))[:-1])
    return [groups[s * len(lengths):(s + 1) * len(lengths)] for s in range(per)]


def train_batch_counts(counts_SxK: np.ndarray) -> np.ndarray:
    """Training batches per bucket from every slot's row count per bucket: n_k = the fewest rows any slot has
    for bucket k, counting the rows it promotes from bucket k - 1 (those beyond n_{k-1})."""
    n_K = np.zeros(counts_SxK.shape[1], np.int64)
    carry_S = np.zeros(counts_SxK.shape[0], np.int64)
    for k in range(len(n_K)):
        avail_S = carry_S + counts_SxK[:, k]
        n_K[k] = avail_S.min()
        carry_S = avail_S - n_K[k]
    return n_K


def _rng(seed: int, epoch: int, slot: int | None = None) -> np.random.Generator:
    # slot + 1: a SeedSequence ignores trailing zero words, so [seed, epoch, 0] would repeat [seed, epoch]
    return np.random.default_rng([seed % 2**32, epoch] + ([] if slot is None else [slot + 1]))


def _slot_epoch(members_K: list[np.ndarray], n_K: np.ndarray, rng: np.random.Generator) -> list[np.ndarray]:
    """One slot's rows for the n_k batches of each bucket: the bucket's rows and those promoted from the bucket
    below, shuffled; the rest move up a bucket, and the last bucket's rest is left out this epoch."""
    out, carry = [], members_K[0][:0]
    for members, n in zip(members_K, n_K, strict=True):
        pool = rng.permutation(np.concatenate([carry, members]))
        out.append(pool[:n])
        carry = pool[n:]
    return out


def _bucket_order(n_K: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """The bucket of each step of an epoch."""
    order = np.repeat(np.arange(len(n_K)), n_K)
    _rng(seed, epoch).shuffle(order)
    return order


def train_epoch_plan(slots: list[list[np.ndarray]], first_slot: int, n_K: np.ndarray, seed: int,
                     epoch: int) -> list[tuple[int, np.ndarray]]:
    """(bucket index, local row indices) of each step of an epoch for the slots first_slot, first_slot + 1, ...

    Global batch j of bucket k is row j of every slot's bucket-k rows in slot order, so a process's rows are its
    block of the global batch, and the global batches are the same for any number of processes.
    """
    order = _bucket_order(n_K, seed, epoch)
    per_slot = [_slot_epoch(members, n_K, _rng(seed, epoch, first_slot + s)) for s, members in enumerate(slots)]
    chunks = [iter(np.stack([rows[k] for rows in per_slot], axis=1)) for k in range(len(n_K))]  # [n_k, slots]
    return [(int(k), next(chunks[k])) for k in order]


def eval_batch_counts(counts_PxK: np.ndarray, local_batch: int) -> np.ndarray:
    """Evaluation batches per bucket so every row is seen: max over processes of ceil(count / local_batch)."""
    return (-(-counts_PxK // local_batch)).max(axis=0)


def _shards(sharding: jax.sharding.NamedSharding | None) -> int:
    return _batch_shards(sharding) if sharding is not None else 1


def _batch_shards(sharding: jax.sharding.NamedSharding) -> int:
    """How many ways the sharding splits the batch axis (the product of the mesh axes named for axis 0)."""
    first = sharding.spec[0] if len(sharding.spec) else None
    names = () if first is None else (first if isinstance(first, tuple) else (first,))
    return math.prod(sharding.mesh.shape[n] for n in names)


def local_batch_size(global_batch_size: int, sharding: jax.sharding.NamedSharding | None,
                     process_count: int) -> int:
    """The rows each process contributes to a global batch; errors when the batch doesn't divide evenly."""
    shards = _batch_shards(sharding) if sharding is not None else 1
    if global_batch_size % shards:
        raise DataError(f"global batch size {global_batch_size} does not divide over the {shards} batch shards of "
                        f"the mesh (data x fsdp); use a multiple of {shards}")
    if global_batch_size % process_count:
        raise DataError(f"global batch size {global_batch_size} does not divide over {process_count} processes; "
                        f"use a multiple of {process_count}")
    return global_batch_size // process_count


def _host_batch(split: TokenizedSplit, idx: np.ndarray, length: int, local_batch: int) -> dict[str, np.ndarray]:
    """Rows `idx` padded to `length`, plus masked filler rows (weight 0) up to local_batch."""
    n = len(idx)
    lens = np.zeros(local_batch, np.int64)
    lens[:n] = split.lengths[idx]
    starts = np.zeros(local_batch, np.int64)
    starts[:n] = split.offsets[idx]
    pos = np.arange(length)
    mask_BxL = pos[None, :] < lens[:, None]
    gather_BxL = np.where(mask_BxL, starts[:, None] + pos[None, :], 0)
    ids = split.input_ids[gather_BxL] if split.input_ids.size else np.zeros_like(gather_BxL)
    types = split.token_type_ids[gather_BxL] if split.input_ids.size else np.zeros_like(gather_BxL)
    mask_BxL[n:, 0] = True  # filler rows attend to one position so no attention row is all masked
    labels = np.zeros((local_batch,) + split.labels.shape[1:], split.labels.dtype)
    labels[:n] = split.labels[idx]
    weight = np.zeros(local_batch, np.float32)
    weight[:n] = 1.0
    return {"input_ids": np.where(mask_BxL, ids, 0).astype(np.int32),
            "attention_mask": mask_BxL.astype(np.int32),
            "token_type_ids": np.where(mask_BxL, types, 0).astype(np.int32),
            "labels": labels, "weight": weight}


def _place(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding | None, global_batch: int):
    """Host batch -> global jax arrays (or the numpy batch itself when no sharding is given)."""
    if sharding is None:
        return batch
    return {k: jax.make_array_from_process_local_data(sharding, v, (global_batch,) + v.shape[1:])
            for k, v in batch.items()}


class _Prefetch:
    """Runs an iterator in a background thread, `size` items ahead; re-raises its errors in the consumer."""

    _END = object()

    def __init__(self, it: Iterator, size: int):
        self._queue: queue.Queue = queue.Queue(maxsize=max(size, 1))
        self._stop = threading.Event()
        self._finished: Any = None
        self._thread = threading.Thread(target=self._run, args=(it,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, it: Iterator) -> None:
        try:
            for item in it:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer thread
            self._put(e)

    def __next__(self) -> Any:
        item = self._finished or self._queue.get()
        if item is self._END:
            self._finished = item
            raise StopIteration
        if isinstance(item, BaseException):
            self._finished = item
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def _check_processes(split: TokenizedSplit) -> None:
    if (split.process_index, split.process_count) != (jax.process_index(), jax.process_count()):
        raise DataError(f"the {split.name} split was loaded as process {split.process_index} of "
                        f"{split.process_count} but this is process {jax.process_index()} of "
                        f"{jax.process_count()}; load it with the default process_index/process_count")


def _check_slots(split: TokenizedSplit, global_batch: int) -> None:
    if split.process_count > 1 and split.batch_slots != global_batch:
        loaded = "without train_batch_size" if split.batch_slots is None else f"for batch size {split.batch_slots}"
        raise DataError(f"the {split.name} split was loaded {loaded} but batches have {global_batch} rows; load it "
                        f"with load_task(..., train_batch_size={global_batch})")


class TrainBatches:
    """Global training batches, epoch after epoch, fixed by (seed, epoch) whatever the process count; resumable.

    Every process must construct it at the same time (it agrees on per-slot counts with the others). Each epoch
    has `steps_per_epoch` = N // B batches of B = `global_batch_size` rows and leaves out
    `rows_dropped_per_epoch` = N % B rows (see the module docstring). With sharding=None it yields numpy host
    batches.
    """

    def __init__(self, split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int], seed: int,
                 sharding: jax.sharding.NamedSharding | None, start_state: dict | None = None,
                 prefetch: int = 2, num_epochs: int | None = None, packing_shapes: int | None = None):
        """packing_shapes: None for padded batches; k for packed ones of at most k row counts (then call
        plan_packing before the first batch)."""
        _check_processes(split)
        self.split, self.seed, self.sharding = split, seed, sharding
        self.global_batch_size, self.prefetch, self.num_epochs = global_batch_size, prefetch, num_epochs
        self.local_batch = local_batch_size(global_batch_size, sharding, split.process_count)
        _check_slots(split, global_batch_size)
        self.packing_shapes = packing_shapes
        self.row_length = row_length(split) if packing_shapes else None  # packed: tokens a row holds
        # Packed batches mix every length (rows fill best that way): one bucket.
        self.bucket_lengths = [split.max_length] if packing_shapes else bucket_lengths(buckets, split.max_length)
        self.row_counts: np.ndarray | None = None  # packed: each step's global rows, [planned epochs, steps]
        self.segments: int | None = None  # packed: text slots per row
        self._per_process = 1  # packed: groups of slots packed apart on this process (plan_packing)
        self._slots = _slot_members(split, global_batch_size, self.bucket_lengths)
        self.first_slot = split.process_index * self.local_batch
        local_SxK = np.array([[len(m) for m in slot] for slot in self._slots])
        counts_SxK = _allgather_counts(local_SxK.ravel()).reshape(global_batch_size, -1)  # processes own blocks
        self.batches_per_bucket = train_batch_counts(counts_SxK)
        self.steps_per_epoch = int(self.batches_per_bucket.sum())
        self.rows_dropped_per_epoch = int(counts_SxK.sum()) - self.steps_per_epoch * global_batch_size
        if self.steps_per_epoch == 0:
            raise DataError(f"the training split has {split.num_rows_total} rows, fewer than one batch of "
                            f"{global_batch_size}; lower train.global_batch_size")
        self._epoch, self._step = 0, 0
        self._source: _Prefetch | Iterator | None = None
        if start_state is not None:
            self.restore(start_state)

    def _groups(self, idx: np.ndarray) -> list[tuple[np.ndarray, list[list[int]]]]:
        """A step's texts packed one group of slots at a time, (the group's split rows, its packed rows) each: a
        group is a batch shard's slots, whose rows it holds, so the packing is the same for any process count on
        the same number of shards."""
        return [(g, packing.pack(self.split.lengths[g], self.row_length))
                for g in np.split(idx, self._per_process)]

    def plan_packing(self, total_steps: int, row_multiple: int = 1) -> None:
        """Packs every batch of a run of `total_steps` steps (all processes at once: they agree on the row counts)
        and fixes its row counts: at most packing_shapes values, each a multiple of the batch shards, the process
        count and `row_multiple` (the micro-batches of gradient accumulation)."""
        p, shards = self.split.process_count, _shards(self.sharding)
        self._per_process = shards // p if shards % p == 0 and self.local_batch % (shards // p) == 0 else 1
        groups = self._per_process * p
        epochs = max(1, -(-total_steps // self.steps_per_epoch))
        need = np.zeros((epochs, self.steps_per_epoch), np.int64)
        most = 1
        for e in range(epochs):
            for s, (_, idx) in enumerate(self.epoch_plan(e)):
                packed = [rows for _, rows in self._groups(idx)]
                need[e, s] = max(map(len, packed))
                most = max([most, *(len(r) for rows in packed for r in rows)])
        gathered = _allgather_counts(np.concatenate([need.ravel(), [most]]))
        unit = math.lcm(shards * row_multiple, p, groups)  # global rows: whole groups, shards and micro-batches
        global_need = packing.round_up(groups * gathered[:, :-1].max(0), unit).reshape(need.shape)
        shapes = np.asarray(packing.choose_shapes(global_need, self.packing_shapes))
        self.row_counts = shapes[np.searchsorted(shapes, global_need)]
        self.segments = int(gathered[:, -1].max())

    def padded_tokens(self, steps: int) -> float:
        """Tokens a step computes per text, over a run's first `steps` steps (packed) or one epoch (padded)."""
        if self.row_counts is not None:
            rows = self.row_counts.ravel()[:steps]
            return float(rows.mean() * self.row_length / self.global_batch_size)
        steps = [self.bucket_lengths[k] for k, _ in self.epoch_plan(0)]
        return float(np.mean(steps))

    def structs(self, steps: int) -> list[dict]:
        """The batch structs (batch_structs) of every shape the next `steps` batches have."""
        if self.row_counts is None:
            return [batch_structs(self.split, self.global_batch_size, n, self.sharding) for n in self.lengths(steps)]
        p, length = self.split.process_count, self.row_length
        return [_structs(packing.host_batch(self.split, np.full((r // p, self.segments), -1), length), r,
                         self.sharding) for r in self.lengths(steps)]

    def lengths(self, steps: int) -> list[int]:
        """The padded lengths of the next `steps` batches (packed: their global row counts): the shapes a run of
        that many steps will train on."""
        if self.row_counts is not None:
            flat = self.row_counts.ravel()[self._epoch * self.steps_per_epoch + self._step:][:steps]
            return sorted({int(r) for r in flat})
        used, epoch, step, left = set(), self._epoch, self._step, steps
        while left > 0 and len(used) < np.count_nonzero(self.batches_per_bucket):
            order = _bucket_order(self.batches_per_bucket, self.seed, epoch)[step:step + left]
            used.update(order.tolist())
            left, epoch, step = left - len(order), epoch + 1, 0
        return sorted(self.bucket_lengths[k] for k in used)

    def epoch_plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket index, local row indices) of each step of an epoch; the bucket order is the same everywhere."""
        return train_epoch_plan(self._slots, self.first_slot, self.batches_per_bucket, self.seed, epoch)

    def _host_stream(self, epoch: int, step: int) -> Iterator[tuple[int, int, dict]]:
        if self.packing_shapes and self.row_counts is None:
            raise RuntimeError("packed TrainBatches need plan_packing(total_steps) before the first batch")
        while self.num_epochs is None or epoch < self.num_epochs:
            for s, (k, idx) in enumerate(self.epoch_plan(epoch)[step:], start=step):
                if self.row_counts is None:
                    batch = _host_batch(self.split, idx, self.bucket_lengths[k], self.local_batch)
                    yield epoch, s, _place(batch, self.sharding, self.global_batch_size)
                    continue
                if epoch >= len(self.row_counts):
                    raise RuntimeError(f"epoch {epoch} is past the {len(self.row_counts)} that plan_packing planned")
                rows = int(self.row_counts[epoch, s])
                per_group = rows // (self._per_process * self.split.process_count)
                slots = np.concatenate([packing.slots(rows, per_group, self.segments, g)
                                        for g, rows in self._groups(idx)])
                batch = packing.host_batch(self.split, slots, self.row_length)
                yield epoch, s, _place(batch, self.sharding, rows)
            epoch, step = epoch + 1, 0

    def _open(self) -> Iterator:
        stream = self._host_stream(self._epoch, self._step)
        return _Prefetch(stream, self.prefetch) if self.prefetch > 0 else stream

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> dict:
        if self._source is None:
            self._source = self._open()
        epoch, step, batch = next(self._source)
        self._epoch, self._step = (epoch, step + 1) if step + 1 < self.steps_per_epoch else (epoch + 1, 0)
        return batch

    def state(self) -> dict:
        """Where the next batch comes from, as JSON-friendly ints; pass it to restore() or start_state."""
        return {"epoch": self._epoch, "step": self._step, "steps_per_epoch": self.steps_per_epoch,
                "seed": self.seed}

    def restore(self, state: dict) -> None:
        """Continues from a state(): the next batch is the one that would have followed."""
        if state.get("steps_per_epoch") != self.steps_per_epoch or state.get("seed") != self.seed:
            raise DataError(f"the saved data iterator state {state} does not match this run (steps_per_epoch "
                            f"{self.steps_per_epoch}, seed {self.seed}); resume with the same data, batch size "
                            f"and seed")
        self.close()
        self._epoch, self._step = int(state["epoch"]), int(state["step"])

    def __del__(self) -> None:
        stop = getattr(getattr(self, "_source", None), "_stop", None)
        if stop is not None:  # a dropped iterator must not leave its thread waiting
            stop.set()

    def close(self) -> None:
        """Stops the prefetch thread."""
        if isinstance(self._source, _Prefetch):
            self._source.close()
        self._source = None


def eval_plan(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
              sharding: jax.sharding.NamedSharding | None) -> list[tuple[int, np.ndarray]]:
    """(padded length, local row indices) of each evaluation batch; processes with fewer rows get fillers."""
    _check_processes(split)
    local_batch = local_batch_size(global_batch_size, sharding, split.process_count)
    lengths = bucket_lengths(buckets, split.max_length)
    members = _bucket_members(split, lengths)
    counts = eval_batch_counts(_allgather_counts(np.array([len(m) for m in members])), local_batch)
    return [(lengths[k], members[k][b * local_batch:(b + 1) * local_batch])
            for k in range(len(lengths)) for b in range(int(counts[k]))]


def batch_structs(split: TokenizedSplit, global_batch_size: int, length: int,
                  sharding: jax.sharding.NamedSharding | None, evaluation: bool = False) -> dict:
    """The fields of a global batch of `length` tokens as jax.ShapeDtypeStructs (shape, dtype, sharding): what a
    step is compiled for before any batch exists. Built by the batch code itself, so the two always agree."""
    local_batch = global_batch_size // split.process_count
    host = (_eval_batch if evaluation else _host_batch)(split, np.zeros(0, np.int64), length, local_batch)
    return _structs(host, global_batch_size, sharding)


def _structs(host: dict, global_rows: int, sharding: jax.sharding.NamedSharding | None) -> dict:
    return {k: jax.ShapeDtypeStruct((global_rows,) + v.shape[1:], v.dtype, sharding=sharding)
            for k, v in host.items()}


def row_length(split: TokenizedSplit) -> int:
    """The tokens of the split's packed rows (packing.row_length of the longest text on any process). Every process
    must call it at the same time."""
    longest = int(_allgather_counts(np.array([split.lengths.max(initial=0)])).max())
    return packing.row_length(longest, split.max_length, split.packing_length, split.name)


def packed_eval_plan(split: TokenizedSplit, global_batch_size: int, sharding: jax.sharding.NamedSharding | None
                     ) -> tuple[int, int, list[np.ndarray], int]:
    """(global rows per batch, text slots per row, each batch's slots [local rows, slots] of local split rows, -1
    empty, tokens per row) of a packed evaluation: the split packed whole into rows of row_length(split), its rows
    cut into batches that hold about `global_batch_size` texts. Every process must call it at the same time."""
    _check_processes(split)
    local_batch_size(global_batch_size, sharding, split.process_count)
    length = row_length(split)
    rows = packing.pack(split.lengths, length)
    most = max([1, *map(len, rows)])
    counts = _allgather_counts(np.array([len(split), len(rows), most]))
    p = split.process_count
    per_text = counts[:, 1].sum() / max(int(counts[:, 0].sum()), 1)
    global_rows = int(packing.round_up(max(1, math.ceil(global_batch_size * per_text)),
                                       math.lcm(_shards(sharding), p)))
    local = global_rows // p
    batches = int((-(-counts[:, 1] // local)).max())
    segments = int(counts[:, 2].max())
    return global_rows, segments, [packing.slots(rows[b * local:(b + 1) * local], local, segments)
                                   for b in range(batches)], length


def eval_structs(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
                 sharding: jax.sharding.NamedSharding | None, packed: bool = False) -> list[dict]:
    """The batch structs of every shape the split's evaluation batches have."""
    if not packed:
        return [batch_structs(split, global_batch_size, n, sharding, evaluation=True)
                for n in eval_lengths(split, global_batch_size, buckets, sharding)]
    rows, segments, _, length = packed_eval_plan(split, global_batch_size, sharding)
    empty = np.full((rows // split.process_count, segments), -1)
    return [_structs(packing.host_batch(split, empty, length, evaluation=True), rows, sharding)]


def eval_lengths(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
                 sharding: jax.sharding.NamedSharding | None) -> list[int]:
    """The padded lengths of the split's evaluation batches."""
    return sorted({length for length, _ in eval_plan(split, global_batch_size, buckets, sharding)})


def eval_batches(split: TokenizedSplit, global_batch_size: int, buckets: Sequence[int],
                 sharding: jax.sharding.NamedSharding | None, prefetch: int = 2, packed: bool = False
                 ) -> Iterator[dict]:
    """Every row of the split exactly once (fields as in training, plus "row"; filler rows have weight 0), padded
    by length bucket or packed (packed_eval_plan).

    Every process must call it at the same time (it agrees on per-bucket counts with the others).
    """
    if packed:
        rows, _, slots, length = packed_eval_plan(split, global_batch_size, sharding)
        stream = (_place(packing.host_batch(split, s, length, evaluation=True), sharding, rows)
                  for s in slots)
    else:
        plan = eval_plan(split, global_batch_size, buckets, sharding)
        local_batch = global_batch_size // split.process_count
        stream = (_place(_eval_batch(split, idx, length, local_batch), sharding, global_batch_size)
                  for length, idx in plan)
    return _prefetched(stream, prefetch) if prefetch > 0 else stream


def _eval_batch(split: TokenizedSplit, idx: np.ndarray, length: int, local_batch: int) -> dict[str, np.ndarray]:
    """A training-style batch plus "row": each row's text index (-1 for fillers), so the windows of a text
    (data.long_text=chunks) can be brought together wherever the batch was evaluated."""
    batch = _host_batch(split, idx, length, local_batch)
    row = np.full(local_batch, -1, np.int32)
    row[:len(idx)] = split.rows[idx]
    return {**batch, "row": row}


def _prefetched(stream: Iterator, size: int) -> Iterator:
    source = _Prefetch(stream, size)
    try:
        while True:
            try:
                item = next(source)
            except StopIteration:
                return
            yield item
    finally:
        source.close()
