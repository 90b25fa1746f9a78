"""A torch Linear as a Flax module: kernel [in, out] (PyTorch's weight transposed), an optional bias, the matmul
of flaxclf.nn.matmul (compute dtype in, fp32 out), and a LoRA adapter where the variables hold one
(flaxclf.nn.lora)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from flaxclf.nn import lora
from flaxclf.nn.matmul import mm


class Dense(nn.Module):
    """nn.Dense's parameter names (kernel, then bias: the same rng order); the parameters stay fp32 and `dtype`
    is the matmul's input dtype. `weights()` hands the raw parameters to code that regroups the product
    (flaxclf.nn.attention.cls_attention), which an adapted layer (`adapted`) does not allow."""

    in_features: int
    features: int
    kernel_init: Any
    use_bias: bool = True
    dtype: Any = jnp.float32

    def setup(self):
        self.kernel = self.param("kernel", self.kernel_init, (self.in_features, self.features), jnp.float32)
        if self.use_bias:
            self.bias = self.param("bias", jax.nn.initializers.zeros, (self.features,), jnp.float32)

    @property
    def adapted(self) -> bool:
        """Whether the variables give this layer a LoRA adapter."""
        return self.has_variable(lora.COLLECTION, "scale")

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        assert not self.adapted, "an adapted Dense computes its product itself"
        return self.kernel, self.bias if self.use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = mm(x, self.kernel, self.dtype)
        if self.use_bias:
            y = y + self.bias
        if self.adapted:
            consts = self.variables[lora.COLLECTION]
            key = self.make_rng("dropout") if "dropout" in consts and self.has_rng("dropout") else None
            y = y + lora.delta(x, self.get_variable("params", lora.A), self.get_variable("params", lora.B), consts,
                               self.dtype, key)
        return y
