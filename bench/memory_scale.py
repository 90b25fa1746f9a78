"""Memory and step time as the job scales: FSDP sharding of BERT-base's state, then length and batch sweeps.

Part 1 (8 fake CPU devices, mesh data=1, fsdp=8, tensor=1): BERT-base (BertConfig() defaults, 4 labels) params +
AdamW state per device, summed from the shard shapes of the state's NamedShardings (flaxclf.runtime.sharding rules),
against the unsharded total; the goal is per-device <= total / 8 + 10%. With --compiled the same ratio comes from
XLA: the train step is compiled on the fsdp mesh and on one device, and the state's bytes per device are
memory_analysis()'s argument bytes less the batch's (temporaries and outputs printed too; a few minutes on this
CPU). Nothing is allocated: the state is abstract (jax.eval_shape).

Part 2 (one device): the flaxclf train step's median time and its compiled memory (memory_analysis:
arguments + outputs + temporaries) for lengths 64, 128, 256, 512 at one batch, and batches at one length, on a
small config (default: MiniLM-L6's shape, random weights) to keep it short.

    .venv/bin/python bench/memory_scale.py                    # both parts
    .venv/bin/python bench/memory_scale.py --part fsdp --compiled
    .venv/bin/python bench/memory_scale.py --part sweep --layers 2 --batches 8,16,32 --lengths 64,128,256,512
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from flaxclf.config import MeshConfig, OptimConfig  # noqa: E402
from flaxclf.models.bert import BertClassifier, BertSpec
from flaxclf.models.bert.families import decays as bert_decays  # noqa: E402
from flaxclf.models.classifier import ClassifierConfig
from flaxclf.options import SINGLE  # noqa: E402
from flaxclf.runtime import sharding
from flaxclf.training import steps  # noqa: E402
from flaxclf.training.optim import make_optimizer  # noqa: E402


def _bytes(x) -> int:
    return math.prod(x.shape) * np.dtype(x.dtype).itemsize


def _per_device_bytes(abstract, shardings) -> int:
    """Bytes one device holds: every leaf's shard shape under its sharding."""
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True))


def _batch_abstract(batch: int, length: int, s) -> dict:
    def i32(shape):
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
    return {"input_ids": i32((batch, length)), "attention_mask": i32((batch, length)),
            "token_type_ids": i32((batch, length)), "labels": i32((batch,)),
            "weight": jax.ShapeDtypeStruct((batch,), jnp.float32, sharding=s)}


def _against_goal(per_device: int, whole: int, fsdp: int) -> dict:
    """The issue's goal: per-device state <= 1/fsdp of the unsharded state + 10%."""
    return {"ratio": round(per_device / whole, 4), "goal_ratio": round(1.1 / fsdp, 4),
            "ok": per_device <= 1.1 * whole / fsdp}


def _compiled_state_bytes(model, tx, abstract, mesh: jax.sharding.Mesh, batch: int, length: int) -> dict:
    """The sharded train step compiled on `mesh`: its memory_analysis() per device, and the bytes of its
    state argument (params + AdamW state + step + rng) = all arguments less the batch's shard."""
    shard = steps.state_shardings(abstract, mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shard)
    sds = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shard)
    batch_sds = _batch_abstract(batch, length, sharding.batch_sharding(mesh))
    start = time.perf_counter()
    m = train.lower(sds, batch_sds).compile().memory_analysis()
    batch_bytes = _per_device_bytes(batch_sds, [x.sharding for x in jax.tree.leaves(batch_sds)])
    out = {k: getattr(m, k) for k in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                      "alias_size_in_bytes")}
    return {**out, "state_bytes": m.argument_size_in_bytes - batch_bytes,
            "compile_s": round(time.perf_counter() - start, 1)}


def fsdp_memory(fsdp: int = 8, compiled: bool = False, batch: int = 32, length: int = 128) -> dict:
    model = BertClassifier(ClassifierConfig(backbone=BertSpec(), num_labels=4, problem_type=SINGLE))
    tx = make_optimizer(OptimConfig(), 1000, bert_decays)
    abstract = steps.abstract_state(model, tx, jnp.float32)
    mesh = sharding.make_mesh(MeshConfig(1, fsdp, 1), devices=jax.devices()[:fsdp])
    shard = steps.state_shardings(abstract, mesh, model)
    state_leaves = {"params": (abstract.params, shard.params), "opt_state": (abstract.opt_state, shard.opt_state)}
    out = {"model": "bert-base (BertConfig())", "mesh": {"data": 1, "fsdp": fsdp, "tensor": 1}}
    full = per_dev = 0
    for name, (a, s) in state_leaves.items():
        f, d = sum(_bytes(x) for x in jax.tree.leaves(a)), _per_device_bytes(a, s)
        out[name] = {"unsharded_MiB": round(f / 2**20, 1), "per_device_MiB": round(d / 2**20, 1)}
        full, per_dev = full + f, per_dev + d
    out["params_plus_opt"] = {"unsharded_MiB": round(full / 2**20, 1), "per_device_MiB": round(per_dev / 2**20, 1),
                              **_against_goal(per_dev, full, fsdp), "from": "shard shapes"}
    if compiled:
        # The same figure from XLA: the step compiled on the fsdp mesh and on one device (the unsharded
        # state), each memory_analysis() per device; the state is every argument but the batch.
        one = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
        runs = {"fsdp": _compiled_state_bytes(model, tx, abstract, mesh, batch, length),
                "one_device": _compiled_state_bytes(model, tx, abstract, one, batch, length)}
        sharded, whole = runs["fsdp"]["state_bytes"], runs["one_device"]["state_bytes"]
        out["compiled_step"] = {
            "batch": batch, "length": length, "unit": "MiB per device",
            **{name: {k: (round(v / 2**20, 1) if k.endswith("bytes") else v) for k, v in r.items()}
               for name, r in runs.items()},
            **_against_goal(sharded, whole, fsdp)}
    return out


def _step_time_and_memory(model: BertClassifier, batch: int, length: int, reps: int) -> dict:
    tx = make_optimizer(OptimConfig(), 1000, bert_decays)
    mesh = sharding.make_mesh(MeshConfig(1, 1, 1), devices=jax.devices()[:1])
    abstract = steps.abstract_state(model, tx, jnp.float32)
    shard = steps.state_shardings(abstract, mesh, model)
    train, _ = steps.compile_steps(model, tx, SINGLE, 1, mesh, shard)
    params = jax.jit(model.init, out_shardings=shard.params)(jax.random.PRNGKey(0), **{
        k: jnp.zeros((1, 8), jnp.int32) for k in ("input_ids", "attention_mask", "token_type_ids")})
    state = steps.TrainState(jnp.zeros((), jnp.int32), params, jax.jit(tx.init)(params), jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    b = {"input_ids": rng.integers(1000, model.config.backbone.vocab_size, (batch, length)).astype(np.int32),
         "attention_mask": np.ones((batch, length), np.int32), "token_type_ids": np.zeros((batch, length), np.int32),
         "labels": rng.integers(0, 4, batch).astype(np.int32), "weight": np.ones(batch, np.float32)}
    b = jax.device_put(b, sharding.batch_sharding(mesh))
    m = train.lower(state, b).compile().memory_analysis()
    state, _ = train(state, b)  # compile + warm-up
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        state, met = train(state, b)
        jax.block_until_ready(met["loss"])
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"batch": batch, "length": length, "step_ms": round(1e3 * med, 1),
            "examples_per_s": round(batch / med, 2), "tokens_per_s": round(batch * length / med),
            "temp_MiB": round(m.temp_size_in_bytes / 2**20, 1),
            "args_plus_out_MiB": round((m.argument_size_in_bytes + m.output_size_in_bytes) / 2**20, 1)}


def sweep(layers: int, lengths: list[int], batches: list[int], batch_at: int, length_at: int, reps: int) -> list:
    spec = BertSpec(hidden_size=384, num_hidden_layers=layers, num_attention_heads=12, intermediate_size=1536)
    model = BertClassifier(ClassifierConfig(backbone=spec, num_labels=4, problem_type=SINGLE))
    rows = [{"sweep": "length", **_step_time_and_memory(model, batch_at, n, reps)} for n in lengths]
    rows += [{"sweep": "batch", **_step_time_and_memory(model, b, length_at, reps)} for b in batches]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", default="fsdp,sweep")
    p.add_argument("--compiled", action="store_true", help="also compile the sharded BERT-base step")
    p.add_argument("--layers", type=int, default=6, help="sweep config: MiniLM-L6's shape with this many layers")
    p.add_argument("--lengths", default="64,128,256,512")
    p.add_argument("--batches", default="8,16,32")
    p.add_argument("--batch-at", type=int, default=8, help="batch of the length sweep")
    p.add_argument("--length-at", type=int, default=128, help="length of the batch sweep")
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    parts = a.part.split(",")
    if "fsdp" in parts:
        print(json.dumps(fsdp_memory(compiled=a.compiled)))
    if "sweep" in parts:
        rows = sweep(a.layers, [int(x) for x in a.lengths.split(",")], [int(x) for x in a.batches.split(",")],
                     a.batch_at, a.length_at, a.reps)
        print(f"{'sweep':7s} {'batch':>5s} {'length':>6s} {'step_ms':>9s} {'ex/s':>8s} {'tok/s':>8s} "
              f"{'temp_MiB':>9s} {'args+out_MiB':>12s}")
        for r in rows:
            print(f"{r['sweep']:7s} {r['batch']:5d} {r['length']:6d} {r['step_ms']:9.1f} {r['examples_per_s']:8.2f} "
                  f"{r['tokens_per_s']:8d} {r['temp_MiB']:9.1f} {r['args_plus_out_MiB']:12.1f}")


if __name__ == "__main__":
    main()
