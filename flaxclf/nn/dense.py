"""A torch Linear as a Flax module: kernel [in, out] (PyTorch's weight transposed), an optional bias, the matmul
of flaxclf.nn.matmul (compute dtype in, fp32 out)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.nn.matmul import mm


class Dense(nn.Module):
    """nn.Dense's parameter names (kernel, then bias: the same rng order); the parameters stay fp32 and `dtype`
    is the matmul's input dtype. `weights()` hands the raw parameters to code that regroups the product
    (flaxclf.nn.attention.cls_attention)."""

    in_features: int
    features: int
    kernel_init: Any
    use_bias: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features), jnp.float32)
        if self.use_bias:
            self.bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), jnp.float32)

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        return self.kernel, self.bias if self.use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = mm(x, self.kernel, self.dtype)
        return y + self.bias if self.use_bias else y
