"""x @ w in a compute dtype with fp32 accumulation, and a backward pass written out for XLA."""

from __future__ import annotations

from functools import partial
from typing import Any

import jax
import jax.numpy as jnp


def mm(x: jax.Array, w: jax.Array, dtype: Any) -> jax.Array:
    """x @ w with both operands in the compute dtype, accumulated and returned in fp32. w is [K, N] (a dense
    kernel) or batched like x (attention).

    The backward pass is written out (custom_vjp) rather than left to JAX's transpose rule: in bf16, JAX's rule
    multiplies the fp32 cotangent by the bf16 operand in fp32, so two thirds of a train step's matmuls would run
    in fp32 (torch's autocast runs them in bf16 too); in fp32, the rule's [B, L, D]-batched contractions make
    XLA:CPU copy activations into transposed layouts, which the explicit 2-D matmuls below avoid with the same
    math. Measured in bench/README.md ("The matmul's backward pass").
    """
    return _mm_vjp(x, w, (jnp.dtype(dtype), x.dtype, w.dtype))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _mm_vjp(x, w, dtypes):
    return jnp.matmul(x.astype(dtypes[0]), w.astype(dtypes[0]), preferred_element_type=jnp.float32)


def _mm_fwd(x, w, dtypes):
    xc, wc = x.astype(dtypes[0]), w.astype(dtypes[0])
    return jnp.matmul(xc, wc, preferred_element_type=jnp.float32), (xc, wc)


def _mm_bwd(dtypes, res, g):
    """Gradients accumulated in fp32 from compute-dtype operands, returned in the operands' own dtypes."""
    (xc, wc), gc = res, g.astype(dtypes[0])
    dx = jnp.matmul(gc, jnp.swapaxes(wc, -1, -2), preferred_element_type=jnp.float32)
    if wc.ndim == 2:  # dense kernel: sum over every leading dimension of x
        dw = jnp.matmul(xc.reshape(-1, xc.shape[-1]).T, gc.reshape(-1, gc.shape[-1]),
                        preferred_element_type=jnp.float32)
    else:
        dw = jnp.matmul(jnp.swapaxes(xc, -1, -2), gc, preferred_element_type=jnp.float32)
    return dx.astype(dtypes[1]), dw.astype(dtypes[2])


_mm_vjp.defvjp(_mm_fwd, _mm_bwd)
