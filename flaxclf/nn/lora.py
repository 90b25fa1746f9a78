"""LoRA (Hu et al. 2021) as peft computes it: y = x W + b + (dropout(x) A) B * alpha / r, with W frozen and A
[in, r], B [r, out] trained (A uniform in +-1/sqrt(in) as peft's kaiming_uniform(a=sqrt(5)), B zero, so a fresh
adapter changes nothing).

An adapter lives in the variables, not in the modules, so that any flaxclf.nn.dense.Dense of any encoder takes
one, whatever builds it (remat, nn.scan templates): `add` puts lora_A and lora_B next to each targeted kernel in
the "params" collection, and the constants of each (its scale and, where above 0, its dropout rate) in a "lora"
collection at the same path. A Dense adds the low-rank term when its "lora" entry is there. What is trained is
LoRA's matrices and the modules peft saves whole (`LoraSpec.save`); `split` separates them from the frozen rest,
and a train step differentiates the first alone, so no weight gradient is computed for the frozen weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from flaxclf.nn.dropout import bernoulli
from flaxclf.nn.matmul import mm

COLLECTION = "lora"
A, B = "lora_A", "lora_B"

Path = tuple[str, ...]


@dataclass(frozen=True)
class LoraSpec:
    """An adapter's shape: its rank, alpha and dropout, the Dense modules it adapts (paths in the "params"
    collection) and the module paths trained whole beside it (peft's modules_to_save: the classifier head)."""

    rank: int
    alpha: float
    dropout: float
    modules: tuple[Path, ...]
    save: tuple[Path, ...]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def trains(self, path: Path) -> bool:
        """Whether a leaf of the "params" collection (its path within it) is trained."""
        return path[-1] in (A, B) or any(path[: len(p)] == p for p in self.save)

    def to_json(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout,
                "modules": ["/".join(m) for m in self.modules], "save": ["/".join(m) for m in self.save]}

    @classmethod
    def from_json(cls, d: dict) -> LoraSpec:
        return cls(int(d["rank"]), float(d["alpha"]), float(d["dropout"]),
                   tuple(tuple(m.split("/")) for m in d["modules"]), tuple(tuple(m.split("/")) for m in d["save"]))


def delta(x: jax.Array, a: jax.Array, b: jax.Array, consts: dict, dtype: Any, key: jax.Array | None) -> jax.Array:
    """(dropout(x) A) B * scale in fp32; the dropout draws from `key` (None: no dropout, as in evaluation). The
    scale multiplies the [.., r] product, not the [.., out] one: the same sum (up to rounding; exact for a power of
    two), without a pass over the layer's output in each direction."""
    if key is not None and "dropout" in consts:
        rate = consts["dropout"]
        keep = bernoulli(key, 1.0 - rate, x.shape)
        x = jnp.where(keep, x / (1.0 - rate), 0.0).astype(x.dtype)
    return mm(mm(x, a, dtype) * consts["scale"], b, dtype)


def add(variables: dict, spec: LoraSpec | None, rng: jax.Array) -> dict:
    """`variables` with the adapter's fresh matrices and constants beside each adapted kernel (works on arrays
    and on jax.eval_shape's structs alike)."""
    if spec is None:
        return variables
    params = flatten_dict(variables["params"])
    consts = {}
    for i, module in enumerate(spec.modules):
        kernel = params[(*module, "kernel")]
        n_in, n_out = kernel.shape
        bound = 1.0 / n_in ** 0.5
        params[(*module, A)] = jax.random.uniform(jax.random.fold_in(rng, i), (n_in, spec.rank), kernel.dtype,
                                                  -bound, bound)
        params[(*module, B)] = jnp.zeros((spec.rank, n_out), kernel.dtype)
        consts[(*module, "scale")] = jnp.asarray(spec.scale, jnp.float32)
        if spec.dropout > 0:
            consts[(*module, "dropout")] = jnp.asarray(spec.dropout, jnp.float32)
    return {**variables, "params": unflatten_dict(params), COLLECTION: unflatten_dict(consts)}


def add_abstract(abstract: dict, spec: LoraSpec | None) -> dict:
    """add() on jax.eval_shape's structs: the shapes and dtypes of the variables with the adapter."""
    return jax.eval_shape(lambda v: add(v, spec, jax.random.PRNGKey(0)), abstract)


def split(variables: dict, spec: LoraSpec | None) -> tuple[dict, dict]:
    """(trained, frozen) parts of a variables tree (or of any tree shaped like it: shardings, structs). Without
    an adapter everything is trained."""
    if spec is None:
        return variables, {}
    flat = flatten_dict(variables)
    trained = {k: v for k, v in flat.items() if k[0] == "params" and spec.trains(k[1:])}
    frozen = {k: v for k, v in flat.items() if k not in trained}
    return unflatten_dict(trained), unflatten_dict(frozen)


def merge(a: dict, b: dict) -> dict:
    """The union of two disjoint parts of a variables tree (split's inverse)."""
    return unflatten_dict({**flatten_dict(a), **flatten_dict(b)})


def merged(variables: dict, spec: LoraSpec | None) -> dict:
    """The plain model's variables: each adapted kernel becomes W + A B * scale, and the adapter is dropped."""
    if spec is None:
        return variables
    params = dict(flatten_dict(variables["params"]))
    for module in spec.modules:
        a, b = params.pop((*module, A)), params.pop((*module, B))
        w = params[(*module, "kernel")]
        params[(*module, "kernel")] = (w + (jnp.asarray(a, jnp.float32) @ jnp.asarray(b, jnp.float32))
                                       * spec.scale).astype(w.dtype)
    return {k: v for k, v in variables.items() if k not in ("params", COLLECTION)} | {
        "params": unflatten_dict(params)}
