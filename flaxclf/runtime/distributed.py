"""Multi-process start-up: jax.distributed from the config or the environment, before devices are touched."""

from __future__ import annotations

import os

import jax

from flaxclf.config import ConfigError, DistributedConfig

# Variables that say a cluster launched this process as one of several (jax.distributed detects the rest).
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")


def _several_processes_launched() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    if "," in hosts:
        return True
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(name, "1").isdigit() and int(os.environ.get(name, "1")) > 1:
            return True
    return "JAX_COORDINATOR_ADDRESS" in os.environ


def _check_explicit(cfg: DistributedConfig) -> None:
    """Outside a cluster jax detects, the coordinator, process count and process id come together or not at all."""
    given = {"coordinator_address": cfg.coordinator_address, "num_processes": cfg.num_processes,
             "process_id": cfg.process_id}
    missing = [f"distributed.{k}" for k, v in given.items() if v is None]
    if 0 < len(missing) < 3 and not _several_processes_launched():
        raise ConfigError(f"{', '.join(missing)} not set while the other distributed fields are, and no TPU pod or "
                          f"SLURM/Open MPI job was detected; set coordinator_address (host:port of process 0), "
                          f"num_processes and process_id together")
    n, i = cfg.num_processes, cfg.process_id
    if n is not None and i is not None and not 0 <= i < n:
        raise ConfigError(f"distributed.process_id {i} is not in [0, distributed.num_processes={n}); number the "
                          f"processes 0 to {n - 1}")


def initialize(cfg: DistributedConfig) -> bool:
    """Starts jax.distributed when the config or the environment asks for it; True if it did."""
    wanted = cfg.mode == "on" or (cfg.mode == "auto" and (cfg.coordinator_address is not None
                                                          or _several_processes_launched()))
    if not wanted or jax.distributed.is_initialized():
        return False
    _check_explicit(cfg)
    if cfg.cpu_collectives != "none":
        # Only the CPU backend reads this; it makes collectives work across processes on CPU (tests, clusters).
        jax.config.update("jax_cpu_collectives_implementation", cfg.cpu_collectives)
    jax.distributed.initialize(coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes,
                               process_id=cfg.process_id)
    return True
