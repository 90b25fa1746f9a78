"""Host memory: keep the memory XLA:CPU frees inside the process, so that the next step does not page-fault it in.

XLA:CPU allocates each call's temporary buffers as one block (over a GB for the MiniLM train step) with malloc
and frees it when the call ends. glibc serves any block over 32 MB with a fresh mmap and returns it with munmap,
so every step touched that many new pages, and paid their page faults again (more when a VM's free page
reporting had handed them back to the host in between). With glibc told to serve everything from its one main
heap and never give it back, the second and later steps fault no page (figures: bench/README.md, "Host
memory"). The cost is that the process keeps its peak heap for its
lifetime, unless a HeapCap trims it: the train loop caps it at one step's working set (train.host_memory_cap_gb).
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable

# mallopt(3) parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

OPT_OUT = "FLAXCLF_KEEP_FREED_MEMORY"  # set to 0 to leave malloc as it is


def keep_freed_memory() -> bool:
    """Tell glibc's malloc to keep freed memory for reuse; True if it took effect.

    Call it early, before the first jax computation: threads that malloc'd before it keep their own arenas,
    and an arena other than the main one maps big blocks afresh whatever the settings. Only the process's
    malloc changes: results are bit-identical. A no-op (False) off glibc or with FLAXCLF_KEEP_FREED_MEMORY=0.
    """
    if os.environ.get(OPT_OUT, "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    global _kept
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    # One arena: every thread allocates from the main heap, which grows with brk and keeps what is freed
    # (other arenas are capped at 64 MB and map bigger blocks with mmap). No mmap: big blocks come from that
    # heap too. Trim threshold -1 (SIZE_MAX): free never hands the heap's top back to the kernel.
    _kept = all(mallopt(param, value) == 1
                for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
    return _kept


# Whether keep_freed_memory() took effect in this process (only then is there a kept heap to cap).
_kept = False


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]


def resident_bytes() -> int:
    """The process's resident memory now (Linux /proc; 0 elsewhere)."""
    try:
        return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def held_bytes() -> int | None:
    """Resident memory less the heap's free bytes: what the process holds in use, code and libraries included
    (glibc >= 2.33's mallinfo2); None where it can't say."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        return max(resident_bytes() - int(libc.mallinfo2().fordblks), 0)
    except (OSError, AttributeError):
        return None


class HeapCap:
    """Gives the kept heap's free pages back to the kernel (malloc_trim) whenever the resident memory passes
    `limit` bytes, checked every `every` seconds on a thread of its own (start()).

    Why: a heap that is never trimmed only grows. XLA:CPU's per-call temporaries differ with each bucket's
    shape, small long-lived blocks land in the holes that big ones leave, and the next big block no longer fits
    in any hole, and the heap grows to a multiple of what it holds (bench/README.md). Trimming above a cap
    that holds one step's working set bounds that, and costs a step its page faults only on the rare trims.

    A trim that leaves the resident memory within `margin` of the limit gave back little more than the pages
    the running step is about to fault in again: the limit sits inside a step's working set, where it would
    trim (and page-fault) every step. Such a trim raises the limit to the resident memory that set it off
    plus `margin`, so that the cap settles above the working set after a trim or two.

    A trim taken between two steps gives back their freed temporaries, and leaves the resident memory low
    whatever the cap. The steps' blocks settle at up to about three times a step's temporaries above what the
    process holds (a step's blocks do not always land in the holes the last one left), and the next steps fault
    them in again. So memory back above the limit less than `spacing` seconds after a trim, and no more than
    `margin` above where that trim started, raises the limit to the resident memory plus `margin`, without a
    trim: that trim gave back pages the steps use. A trim can't lower the peak of memory that comes back, only
    add its page faults (without this rule the packed main job trims every few seconds: bench/README.md, "Host
    memory").

    Otherwise the heap is trimmed again once `spacing` seconds have passed since the last trim, or at once where
    it grew more than `margin` past both the limit and where the last trim started (the buckets' fragmentation)."""

    def __init__(self, limit: int, every: float = 0.2, margin: int = 256 * 2**20, spacing: float = 10.0):
        self.limit, self.every, self.margin, self.spacing = int(limit), every, margin, spacing
        self.start_limit, self.trims, self.raises = self.limit, 0, 0
        self._last = float("-inf")  # when the last trim was (time.monotonic())
        self._trimmed_at = 0  # the resident bytes that set the last trim off
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self, resident: int, trim: Callable[[], int], now: float) -> None:
        """One look at `resident` bytes at time `now` (seconds); trim() gives the heap's free pages back and
        returns the resident bytes after it."""
        if resident <= self.limit:
            return
        recent = now - self._last < self.spacing
        if recent and resident <= self._trimmed_at + self.margin:
            # Back above the cap within `spacing` of the last trim, and no higher than where it started: that trim
            # gave back pages the steps use, and the next would too.
            self._raise_above(resident)
            return
        if recent and resident <= self.limit + self.margin:
            return
        after = trim()
        self.trims, self._last, self._trimmed_at = self.trims + 1, now, resident
        if after > self.limit - self.margin:
            self._raise_above(resident)

    def _raise_above(self, resident: int) -> None:
        self.limit = resident + self.margin
        self.raises += 1

    def start(self) -> HeapCap:
        malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim

        def trim() -> int:
            malloc_trim(0)
            return resident_bytes()

        def watch() -> None:
            while not self._stop.wait(self.every):
                self.look(resident_bytes(), trim, time.monotonic())

        self._thread = threading.Thread(target=watch, name="flaxclf-heap-cap", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def cap_heap(limit: int) -> HeapCap | None:
    """A started HeapCap at `limit` bytes where keep_freed_memory() took effect (elsewhere malloc returns big
    blocks by itself), and limit > 0."""
    return HeapCap(limit).start() if _kept and limit > 0 else None


def cap_heap_at_working_set(step_temp_bytes: int) -> HeapCap | None:
    """cap_heap at one step's working set: what the process holds now (its state, its compiled steps) plus 1.25
    times the step's XLA temporaries, with room for the batches around it. None where there is nothing to size it
    by (no mallinfo2, or no temporaries known)."""
    held = held_bytes()
    if held is None or step_temp_bytes <= 0:
        return None
    return cap_heap(held + int(1.25 * step_temp_bytes))
