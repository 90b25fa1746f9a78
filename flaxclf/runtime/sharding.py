"""The device mesh, and shardings from param-path rules: where every array of a run lives."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from flaxclf.config import ConfigError, MeshConfig

AXES = ("data", "fsdp", "tensor")

# Sharding rules are (regex searched in the "/"-joined key path, spec) pairs; the first match wins and no match
# means replicated. Each encoder keeps its own (flaxclf.models.interface.Encoder.sharding_rules).
Rules = Sequence[tuple[str, P]]


def _resolve_shape(cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Replaces the one -1 axis size by the devices the other axes leave."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes and n_devices % fixed == 0:
        sizes[sizes.index(-1)] = n_devices // fixed
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh sizes (data={cfg.data}, fsdp={cfg.fsdp}, tensor={cfg.tensor}) do not multiply to the "
            f"{n_devices} available devices; choose sizes whose product is {n_devices} or set one to -1")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "fsdp", "tensor") mesh over `devices` (default: all devices)."""
    all_devices = jax.devices()
    devices = list(all_devices if devices is None else devices)
    shape = _resolve_shape(cfg, len(devices))
    # Explicit axis types break the HF modules, which carry no sharding annotations.
    axis_types = (AxisType.Auto,) * len(AXES)
    if devices == all_devices:
        # jax.make_mesh orders devices to follow the physical topology (TPU/GPU interconnect).
        return jax.make_mesh(shape, AXES, axis_types=axis_types, devices=devices)
    return Mesh(np.array(devices).reshape(shape), AXES, axis_types=axis_types)


def _key_name(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def path_str(key_path: Sequence[Any]) -> str:
    """A pytree key path as "a/b/0/c"."""
    return "/".join(_key_name(k) for k in key_path)


def _fit(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drops from `spec` each mesh axis that does not divide its dimension; trims trailing Nones."""
    if len(spec) > len(shape):
        raise ValueError(f"partition spec {spec} has more entries than the rank of shape {tuple(shape)}")
    out: list[Any] = []
    for dim, entry in zip(shape, list(spec) + [None] * (len(shape) - len(spec)), strict=True):
        axes = (entry,) if isinstance(entry, str) else tuple(entry or ())
        kept, size = [], 1
        for a in axes:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    while out and out[-1] is None:
        out.pop()
    return P(*out)


def _rule(path: str, rules: Rules) -> P:
    return next((spec for pattern, spec in rules if re.search(pattern, path)), P())


def spec_for(path: str, shape: Sequence[int], mesh: Mesh, rules: Rules) -> P:
    """The spec of the first rule whose regex is found in `path`, fitted to `shape`; P() when none match. A LoRA
    matrix (flaxclf.nn.lora) follows its layer's kernel: A [in, r] splits `in` as the kernel does, B [r, out] its
    `out`, so that a sharded adapter's products need no other layout than the kernel's."""
    head, _, leaf = path.rpartition("/")
    if leaf in ("lora_A", "lora_B"):
        kernel = list(_rule(f"{head}/kernel", rules)) + [None, None]
        return _fit(P(kernel[0], None) if leaf == "lora_A" else P(None, kernel[1]), shape, mesh)
    return _fit(_rule(path, rules), shape, mesh)


def param_specs(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of PartitionSpec for any tree of arrays / ShapeDtypeStructs (params or optimizer state)."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: spec_for(path_str(kp), np.shape(x), mesh, rules), tree)


def tree_shardings(tree: Any, mesh: Mesh, rules: Rules) -> Any:
    """A tree of NamedSharding for `tree`, following the rules."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules),
                        is_leaf=lambda x: isinstance(x, P))


def to_host(x: jax.Array) -> np.ndarray:
    """A global (possibly sharded, multi-process) array as numpy on every process; all processes must call it."""
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim split over both the "data" and "fsdp" axes; other dims replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
    """Full copy on every device."""
    return NamedSharding(mesh, P())
