"""Compilation: the job's steps compiled ahead of time for exactly the batch shapes the run will use, several at
once while the weights load, and JAX's persistent compilation cache in flaxclf's cache folder, so that a second
run of the same job reads its executables instead of compiling them.

Each bucket length is its own executable (flaxclf.data.batches), and compiling one takes seconds; from the cache
an executable loads in a fraction of that (bench/README.md, section 5).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax

from flaxclf import assets
from flaxclf.runtime.timing import STEP_LOAD_EVENT

CACHE_MAX_BYTES = 4 * 2**30
log = logging.getLogger(__name__)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def machine_key() -> str:
    """What an executable depends on besides its program: jax and jaxlib, the devices, and the host CPU (an
    XLA:CPU executable uses the instructions of the CPU that compiled it; a cache folder shared by several
    machines keeps one subfolder per kind)."""
    import jaxlib

    cpu = ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(("model name", "flags")):
                cpu += line
            if line.strip() == "":  # the first processor is enough
                break
    except OSError:
        cpu = platform.processor()
    devices = jax.devices()
    text = "|".join([jax.__version__, jaxlib.__version__, devices[0].platform, devices[0].device_kind,
                     str(len(devices)), getattr(devices[0].client, "platform_version", ""), platform.machine(),
                     cpu])
    return f"jax{jax.__version__}-{devices[0].platform}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def enable_cache(root: Path) -> Path | None:
    """Turns on JAX's persistent compilation cache in root/<machine_key()>; returns that folder, or None where it
    stays off: when the process already set jax_compilation_cache_dir (the caller's cache is left as it is), or
    on macOS, whose jaxlib can crash loading a cached CPU executable. Every executable is cached, however quick
    to compile, so that a second run compiles nothing."""
    if jax.config.jax_compilation_cache_dir or platform.system() == "Darwin":
        return None
    from jax.experimental.compilation_cache import compilation_cache

    path = root.expanduser() / machine_key()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning(f"compilation cache off: can't create {path} ({e.strerror}); set train.compilation_cache_dir "
                    "to a writable folder, or train.compilation_cache=false")
        return None
    if not os.access(path, os.W_OK | os.X_OK):
        log.warning(f"compilation cache off: {path} is not writable; set train.compilation_cache_dir to a "
                    "writable folder, or train.compilation_cache=false")
        return None
    # Bounded once, here, rather than by JAX's own eviction (jax_compilation_cache_max_size), which locks the
    # folder and reads every entry's access time on every write: its cost grows with the folder, and it slowed a
    # cold compile-heavy test file from 42 s to 67 s.
    trim_cache(path, CACHE_MAX_BYTES)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # JAX decides once per process whether to use the cache, at its first compile: start that decision over.
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(path))
    return path


def enable_configured_cache(train_cfg: Any) -> Path | None:
    """The cache a run's train settings ask for (train.compilation_cache, train.compilation_cache_dir, else
    flaxclf's cache folder): `flaxclf train` and the commands that load a run enable the same one."""
    if not train_cfg.compilation_cache:
        return None
    return enable_cache(Path(train_cfg.compilation_cache_dir or assets.cache_root() / "xla"))


def trim_cache(path: Path, max_bytes: int) -> None:
    """Deletes JAX's cache entries in `path`, the least recently used first, until the rest fit in max_bytes
    (their access times; the bookkeeping files of JAX's own eviction go with them)."""
    entries = []
    for f in path.glob("*-cache"):
        with contextlib.suppress(OSError):
            st = f.stat()
            entries.append((max(st.st_atime, st.st_mtime), st.st_size, f))
    total = 0
    for _, size, f in sorted(entries, key=lambda e: e[0], reverse=True):
        total += size
        if total > max_bytes:
            for dead in (f, f.with_name(f.name.removesuffix("-cache") + "-atime")):
                dead.unlink(missing_ok=True)


def structs(tree: Any, shardings: Any) -> Any:
    """Shape-dtype structs with shardings: what lower() needs to compile for arrays that do not exist yet."""
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _code_hash() -> str:
    """flaxclf's own source: a step is a function of this code, its settings and its argument shapes."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _library_key() -> str:
    import flax
    import optax

    flags = {k: jax.config.values.get(k) for k in ("jax_enable_x64", "jax_default_matmul_precision",
                                                      "jax_default_prng_impl", "jax_threefry_partitionable")}
    return repr((machine_key(), jax.__version__, flax.__version__, optax.__version__, flags,
                 os.environ.get("XLA_FLAGS", ""), os.environ.get("LIBTPU_INIT_ARGS", ""), _code_hash()))


class StepCache:
    """The job's step executables on disk, keyed by everything they are made from (flaxclf's source, the
    libraries, the machine, the caller's description of the step's settings and the arguments' shapes, dtypes
    and shardings), so that a later run loads them without tracing or lowering: JAX's own cache keys on the
    lowered program, and tracing and lowering are most of what a warm start would spend (bench/README.md,
    section 8). A file that can't be read is compiled again; one that can't be written is skipped."""

    def __init__(self, folder: Path, devices: list, max_bytes: int = CACHE_MAX_BYTES // 4):
        self.folder, self.devices, self.max_bytes = folder, devices, max_bytes
        self._library = _library_key()

    def path(self, description: str, args: tuple) -> Path:
        structs_repr = repr(jax.tree.map(lambda a: (a.shape, str(a.dtype), str(a.sharding)), args))
        where = (jax.process_index(), jax.process_count(), [d.id for d in self.devices])
        key = hashlib.sha256(repr((self._library, where, description, structs_repr)).encode()).hexdigest()
        return self.folder / f"{key}.exe"

    def load(self, path: Path) -> Any:
        import pickle
        import time

        from jax import monitoring
        from jax.experimental import serialize_executable

        start = time.perf_counter()
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = serialize_executable.deserialize_and_load(payload, in_tree, out_tree,
                                                                 execution_devices=self.devices)
        except FileNotFoundError:
            return None
        except Exception as e:  # noqa: BLE001 - a torn or stale file costs a compile, never the run
            log.debug("step cache: %s unreadable (%s); compiling", path, e)
            return None
        monitoring.record_event_duration_secs(STEP_LOAD_EVENT, time.perf_counter() - start)
        with contextlib.suppress(OSError):  # recently used: the last to be dropped (a read-only file still loads)
            os.utime(path)
        return compiled

    def save(self, path: Path, compiled: Any) -> None:
        import pickle
        import tempfile

        from jax.experimental import serialize_executable

        try:
            blob = pickle.dumps(serialize_executable.serialize(compiled))
        except Exception as e:  # noqa: BLE001 - an executable that can't be serialized is simply not cached
            log.debug("step cache: can't serialize (%s)", e)
            return
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.folder, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)  # readers see a whole file or none
            self._trim()
        except OSError as e:
            log.debug("step cache: can't write %s (%s)", path, e)

    def _trim(self) -> None:
        files = sorted(self.folder.glob("*.exe"), key=lambda p: p.stat().st_mtime, reverse=True)
        total = 0
        for f in files:
            total += f.stat().st_size
            if total > self.max_bytes:
                f.unlink(missing_ok=True)


def _shape_key(batch: dict) -> tuple:
    """What tells a batch's executables apart: its tokens' shape, and a packed batch's text slots per row."""
    return tuple(batch["input_ids"].shape), tuple(batch["weight"].shape)


class Precompiled:
    """A jitted step whose executables for given batch shapes are compiled in the background (or loaded from
    a StepCache), ahead of their first use; a call dispatches on its batch's shape (_shape_key), and any other
    shape goes to jit as before. `description` names everything the step closes over besides its arguments
    (model, optimizer settings, loss, mesh): it is part of the cache key."""

    def __init__(self, jitted: Callable, pool: ThreadPoolExecutor, cache: StepCache | None = None,
                 description: str = ""):
        self.jitted, self._pool, self._cache, self._description = jitted, pool, cache, description
        self._futures: dict[tuple[int, ...], Future] = {}
        self._ready: dict[tuple[int, ...], Any] = {}

    def _compile(self, args: tuple) -> Any:
        path = self._cache.path(self._description, args) if self._cache else None
        if path is not None and (compiled := self._cache.load(path)) is not None:
            return compiled
        _watch_jax_cache()
        _thread.read_from_jax_cache = False
        compiled = self.jitted.lower(*args).compile()
        # Only a fresh compile is saved: an executable that JAX read from its own cache serializes without
        # some of its functions (XLA:CPU, jax 0.10.2: "Function iota_bitcast_fusion not found" when run).
        if path is not None and not _thread.read_from_jax_cache:
            self._cache.save(path, compiled)
        return compiled

    def start(self, args: Iterable[tuple]) -> Precompiled:
        """Starts compiling for each argument tuple (structs; the batch, a dict, last)."""
        for a in args:
            key = _shape_key(a[-1])
            if key not in self._futures:
                self._futures[key] = self._pool.submit(self._compile, a)
        return self

    def wait(self) -> None:
        """Blocks until every executable started is compiled; re-raises a compile error."""
        for key, future in self._futures.items():
            self._ready[key] = future.result()

    def __call__(self, *args):
        key = _shape_key(args[-1])
        exe = self._ready.get(key)
        if exe is None and key in self._futures:
            exe = self._ready[key] = self._futures[key].result()
        return (exe or self.jitted)(*args)

    def shapes(self) -> list[tuple[int, ...]]:
        """The input_ids shapes of the executables started."""
        return sorted(key[0] for key in self._futures)

    def temp_bytes(self) -> int:
        """The largest temporaries of the executables ready so far (XLA's memory analysis; 0 if none says)."""
        out = 0
        for exe in self._ready.values():
            try:
                out = max(out, int(exe.memory_analysis().temp_size_in_bytes))
            except Exception:  # noqa: BLE001 - an executable that can't say (a backend without the analysis)
                continue
        return out


_thread = threading.local()
_watching = []


def _watch_jax_cache() -> None:
    """Marks, per thread, a compile that JAX's persistent cache answered (its listeners run in the compiling
    thread)."""
    if _watching:
        return
    from jax import monitoring

    def on_event(event: str, **_) -> None:
        if event == "/jax/compilation_cache/cache_hits":
            _thread.read_from_jax_cache = True
    _watching.append(on_event)
    monitoring.register_event_listener(on_event)


def pool(jobs: int) -> ThreadPoolExecutor:
    """Threads that compile (or load) the steps while the main thread loads the weights: one per 4 cores, at
    least one. XLA:CPU already spreads one compile over the cores (on 2 cores the default job's 14 steps took
    88 s on one thread and 87 s on two), and loads from the cache contend (6.1 s on one thread, 9.7 s on two);
    on a many-core host, or for a GPU, whose compiles run on one core, a few at once pay."""
    return ThreadPoolExecutor(max(1, min(_cpu_count() // 4, jobs)), thread_name_prefix="flaxclf-compile")
