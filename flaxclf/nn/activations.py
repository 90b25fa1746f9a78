"""The activations that config.json's hidden_act (and a head's activation) name, as PyTorch computes them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def gelu_erf(x: jax.Array) -> jax.Array:
    """PyTorch's exact GELU, x * 0.5 * (1 + erf(x / sqrt(2))), with the same formula.

    The select is there for XLA:CPU's fusion, not the math: below -6 the value is under 6e-9 in magnitude
    (erf's fp32 result is -1 there, so the formula gives 0 or -4e-8 depending on erf's clamp). YNNPACK's dot
    fusions absorb the elementwise producers of a matmul operand and run them as separate passes over memory; a
    select, which YNNPACK does not take, keeps the GELU out of the next layer's matmul (bench/README.md, "GELU
    and the next matmul").
    """
    return _gelu_erf(x)


@jax.custom_vjp
def _gelu_erf(x):
    return jnp.where(x > -6.0, x * 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476)), 0.0)


def _gelu_fwd(x):
    return _gelu_erf(x), x


def _gelu_bwd(x, g):
    # d/dx x * Phi(x) = Phi(x) + x * phi(x), in one elementwise pass over the saved input
    cdf = 0.5 * (1.0 + jax.lax.erf(x * 0.7071067811865476))
    pdf = jnp.exp(-0.5 * x * x) * 0.3989422804014327
    return (jnp.where(x > -6.0, g * (cdf + x * pdf), 0.0),)


_gelu_erf.defvjp(_gelu_fwd, _gelu_bwd)


ACTIVATIONS = {
    "gelu": gelu_erf,
    "gelu_new": lambda x: nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: nn.gelu(x, approximate=True),
    "relu": nn.relu,
    "silu": nn.silu,
    "swish": nn.silu,
    "tanh": jnp.tanh,
}
