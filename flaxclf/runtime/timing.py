"""Where a run's time goes: wall-clock phases that add up to the run's wall time, and what JAX spent compiling.

Phases are exclusive: entering one pauses the one around it, so the breakdown sums to the wall time (the rest,
outside any phase, is "other"). Compilation is also counted where it happens, from JAX's own compile events
(tracing, lowering, and the backend's compile or persistent-cache read), so a compile inside a training step
still shows up under compilation.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# In the order a run meets them; summary.json["time"] lists them so.
PHASES = ("startup", "data", "model", "compile", "train", "evaluate", "checkpoint", "export", "plots", "other")

# JAX's events for the three stages of a compile: tracing to a jaxpr, lowering to MLIR, and XLA's compile (or
# the persistent cache's read, which replaces it).
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
_BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
_COMPILE_EVENTS = {_TRACE_EVENT: "trace_s", "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
                   _BACKEND_EVENT: "backend_s"}
_CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
# flaxclf.runtime.compilation.StepCache's load of a whole step executable (no tracing, lowering or compiling).
STEP_LOAD_EVENT = "/flaxclf/step_cache/load_duration"

_lock = threading.Lock()
_compile = {"seconds": 0.0, "compiles": 0, "cache_hits": 0, "traces": 0, "trace_s": 0.0, "lower_s": 0.0,
            "backend_s": 0.0, "load_s": 0.0, "step_loads": 0}
_listening = False


def _on_duration(event: str, seconds: float, **_) -> None:
    if event in _COMPILE_EVENTS:
        with _lock:
            _compile["seconds"] += seconds
            _compile[_COMPILE_EVENTS[event]] += seconds
            _compile["compiles"] += event == _BACKEND_EVENT
            _compile["traces"] += event == _TRACE_EVENT
    elif event == STEP_LOAD_EVENT:
        with _lock:
            _compile["seconds"] += seconds
            _compile["load_s"] += seconds
            _compile["step_loads"] += 1
            _compile["compiles"] += 1
            _compile["cache_hits"] += 1


def _on_event(event: str, **_) -> None:
    if event == _CACHE_HIT_EVENT:
        with _lock:
            _compile["cache_hits"] += 1


def listen() -> None:
    """Count JAX's compile events from now on (once per process)."""
    global _listening
    from jax import monitoring

    with _lock:
        if _listening:
            return
        _listening = True
    monitoring.register_event_duration_secs_listener(_on_duration)
    monitoring.register_event_listener(_on_event)


def compile_totals() -> dict:
    """Seconds JAX has spent compiling in this process (summed over threads), backend compiles, traces, cache
    reads."""
    with _lock:
        return dict(_compile)


def process_age() -> float:
    """Seconds since this process started (Linux: /proc), so start-up counts the imports; 0 elsewhere."""
    try:
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        uptime = float(open("/proc/uptime").read().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return 0.0


class Clock:
    """Exclusive wall-clock phases of one run. `since_process_start`: count the process's life so far (its
    imports) as start-up, as the flaxclf command does; a library caller's run starts at the Clock."""

    def __init__(self, since_process_start: bool = False):
        listen()
        self.t0 = time.perf_counter()
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.before = process_age() if since_process_start else 0.0  # the process's life before this Clock
        self.seconds["startup"] = self.before
        self._stack: list[tuple[str, float]] = []
        self._compile0 = compile_totals()
        # How much each phase raised the process's peak resident memory: the high-water mark is read at every
        # phase switch and its rise charged to the phase that was running, so a run shows where its peak comes
        # from (the imports and whatever ran before the Clock count as start-up).
        self._peak = peak_rss_bytes()
        self.peak_rise = dict.fromkeys(PHASES, 0)
        self.peak_rise["startup"] = self._peak

    def _charge_peak(self, name: str) -> None:
        peak = peak_rss_bytes()
        self.peak_rise[name] += peak - self._peak
        self._peak = peak

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self._stack:  # pause the enclosing phase
            outer, since = self._stack[-1]
            self.seconds[outer] += now - since
            self._charge_peak(outer)
        else:
            self._charge_peak("other")
        self._stack.append((name, now))
        try:
            yield
        finally:
            end = time.perf_counter()
            _, since = self._stack.pop()
            self.seconds[name] += end - since
            self._charge_peak(name)
            if self._stack:
                self._stack[-1] = (self._stack[-1][0], end)

    def wall(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def breakdown(self) -> dict:
        """{"wall_s", "phases_s": {phase: seconds}, "compilation": {...}, "peak_rss_gb", "peak_rss_rise_gb": {phase:
        how much the peak rose while it ran}} with "other" the unassigned rest; the rises add up to the peak."""
        wall = self.wall()
        phases = {k: v for k, v in self.seconds.items() if k != "other"}
        phases["other"] = max(wall - sum(phases.values()), 0.0)
        now = compile_totals()
        compiled = {k: round(now[k] - self._compile0[k], 3) for k in now}
        self._charge_peak(self._stack[-1][0] if self._stack else "other")
        return {"wall_s": wall, "phases_s": {k: round(v, 3) for k, v in phases.items()}, "compilation": compiled,
                "peak_rss_gb": round(self._peak / 1e9, 3),
                "peak_rss_rise_gb": {k: round(v / 1e9, 3) for k, v in self.peak_rise.items()}}


def peak_rss_bytes() -> int:
    """The process's peak resident memory so far (getrusage; Linux reports KiB)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def describe(breakdown: dict) -> str:
    """One line: the phases over a second, largest first, and the compilation total."""
    wall = breakdown["wall_s"]
    shown = sorted(((v, k) for k, v in breakdown["phases_s"].items() if v >= 0.5), reverse=True)
    parts = ", ".join(f"{k} {v:.0f} s ({v / wall:.0%})" for v, k in shown)
    c = breakdown["compilation"]
    cached = f", {c['cache_hits']} read from the compilation cache" if c["cache_hits"] else ""
    rises = sorted(((v, k) for k, v in breakdown["peak_rss_rise_gb"].items() if v >= 0.05), reverse=True)
    by = ", ".join(f"{k} +{v:.2f}" for v, k in rises)
    return (f"time: {parts}; compilation {c['seconds']:.0f} s over {c['compiles']} executables{cached}; "
            f"peak memory {breakdown['peak_rss_gb']:.2f} GB ({by})")
