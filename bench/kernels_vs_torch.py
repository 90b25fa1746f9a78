"""The kernels behind bench/README.md section 1, side by side with torch: raw matmuls at MiniLM's shapes (fp32,
and bf16 returning bf16 or fp32), one attention block in three formulations, and dropout on a hidden state
(bench/README.md section 8, "Dropout masks").

    .venv/bin/python bench/kernels_vs_torch.py

Each figure is the median of `--reps` calls after a warm-up; GFLOP/s for matmuls, ms for attention.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import torch

# (M, K, N): the dense matmuls of MiniLM-L6 at 32 x 128 tokens (train) and 64 x 128 (inference)
SHAPES = [(4096, 1536, 384), (4096, 384, 384), (4096, 384, 1536), (4096, 384, 1152), (8192, 384, 1536)]


def median_s(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def matmuls(reps: int) -> list[dict]:
    rng = np.random.default_rng(0)
    f32 = jax.jit(lambda x, y: x @ y)  # also bf16 x bf16 -> bf16
    to_f32 = jax.jit(lambda x, y: jnp.matmul(x, y, preferred_element_type=jnp.float32))
    rows = []
    for m, k, n in SHAPES:
        a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
        flop = 2 * m * k * n / 1e9
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ha, hb = ja.astype(jnp.bfloat16), jb.astype(jnp.bfloat16)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        tha, thb = ta.bfloat16(), tb.bfloat16()

        def rate(fn, x, y, flop=flop):
            return round(flop / median_s(lambda: jax.block_until_ready(fn(x, y)), reps), 1)
        rows.append({"shape": [m, k, n], "jax_fp32": rate(f32, ja, jb), "jax_bf16_to_bf16": rate(f32, ha, hb),
                     "jax_bf16_to_fp32": rate(to_f32, ha, hb), "torch_fp32": rate(torch.matmul, ta, tb),
                     "torch_bf16": rate(torch.matmul, tha, thb)})
    return rows


def attention(batch: int, reps: int, heads: int = 12, length: int = 128, dh: int = 32) -> dict:
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((batch, heads, length, dh), np.float32) for _ in range(3))
    lengths = rng.integers(length // 4, length + 1, batch)
    bias = np.where(np.arange(length)[None] < lengths[:, None], 0.0, np.finfo(np.float32).min)
    bias = bias[:, None, None, :].astype(np.float32)

    def softmax_matmul(q, k, v, b):  # FlaxBertSelfAttention's formulation (transposes aside)
        return jnp.matmul(jax.nn.softmax(jnp.matmul(q, jnp.swapaxes(k, -1, -2)) + b), v)

    def exp_matmul_divide(q, k, v, b):  # flaxclf.models.bert.encoder without dropout
        s = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) + b
        e = jnp.exp(s - s.max(-1, keepdims=True))
        return jnp.matmul(e, v) / e.sum(-1, keepdims=True)
    args = [jnp.asarray(x) for x in (q, k, v, bias)]
    out = {}
    for name, f in (("jax_softmax_matmul", softmax_matmul), ("jax_exp_matmul_divide", exp_matmul_divide)):
        g = jax.jit(f)
        out[name] = round(1e3 * median_s(lambda g=g: g(*args).block_until_ready(), reps), 1)
    tq, tk, tv, tb = (torch.from_numpy(x) for x in (q, k, v, bias))
    with torch.inference_mode():
        out["torch_sdpa"] = round(1e3 * median_s(
            lambda: torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, attn_mask=tb), reps), 1)
    a, b = (np.asarray(jax.jit(f)(*args)) for f in (softmax_matmul, exp_matmul_divide))
    out["max_abs_diff_formulations"] = float(np.abs(a - b).max())
    return {"batch": batch, "heads": heads, "length": length, "head_dim": dh, "ms": out}


def dropout(shape: tuple[int, ...], reps: int, rate: float = 0.1) -> dict:
    """Dropout of a [B, L, D] hidden state in training: the mask of jax.random.bernoulli (JAX's CPU lowering of
    the Threefry hash) and of flaxclf.nn.dropout.bernoulli (the same bits, the hash unrolled), applied as
    flaxclf.nn.dropout.Dropout applies it; torch's F.dropout."""
    from flaxclf.nn.dropout import bernoulli

    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape, np.float32))
    key = jax.random.PRNGKey(0)

    def apply(draw):
        return jax.jit(lambda k, x: jax.lax.select(draw(k, 1.0 - rate, x.shape), x / (1.0 - rate), jnp.zeros_like(x)))
    out = {}
    for name, draw in (("jax_random_bernoulli", jax.random.bernoulli), ("flaxclf_bernoulli", bernoulli)):
        g = apply(draw)
        out[name] = round(1e3 * median_s(lambda g=g: g(key, x).block_until_ready(), reps), 2)
    tx = torch.from_numpy(np.asarray(x))
    out["torch_dropout"] = round(1e3 * median_s(lambda: torch.nn.functional.dropout(tx, rate, training=True), reps), 2)
    same = bool((np.asarray(jax.random.bernoulli(key, 1.0 - rate, shape))
                 == np.asarray(jax.jit(bernoulli, static_argnums=2)(key, 1.0 - rate, shape))).all())
    return {"shape": list(shape), "rate": rate, "ms": out, "same_mask": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=10)
    a = p.parse_args()
    print(json.dumps({"jax": jax.__version__, "torch": torch.__version__, "torch_threads": torch.get_num_threads()}))
    for row in matmuls(a.reps):
        print(json.dumps({"matmul_gflop_s": row}))
    for batch in (32, 64):
        print(json.dumps({"attention": attention(batch, a.reps)}))
    for shape in ((32, 128, 768), (32, 128, 384), (32, 40, 384)):  # BERT-base, MiniLM, MiniLM at the job's lengths
        print(json.dumps({"dropout": dropout(shape, a.reps)}))


if __name__ == "__main__":
    main()
