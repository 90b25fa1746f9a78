"""Host memory: keep the memory XLA:CPU frees inside the process, so that the next step does not page-fault it in.

XLA:CPU allocates each call's temporary buffers as one block (1.5 GB for the MiniLM train step at 32 x 128)
with malloc and frees it when the call ends. glibc serves any block over 32 MB with a fresh mmap and returns
it with munmap, so every step touched 1.5 GB of new pages: ~370k page faults and 0.6-0.8 s of kernel time in
a 2 s step, and 2-4 s when the kernel had handed the freed pages back to the host in between (a VM's free page
reporting; measured with torch stepping between our steps, as bench/step_vs_torch.py does). With glibc told
to serve everything from its one main heap and never give it back, the second and later steps fault no page
and the step runs ~10-40% faster (bench/README.md). The cost is that the process keeps its peak heap for its
lifetime, which a training process reaches on its first step anyway.
"""

from __future__ import annotations

import ctypes
import os
import platform

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
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    # One arena: every thread allocates from the main heap, which grows with brk and keeps what is freed
    # (other arenas are capped at 64 MB and map bigger blocks with mmap). No mmap: big blocks come from that
    # heap too. Trim threshold -1 (SIZE_MAX): free never hands the heap's top back to the kernel.
    return all(mallopt(param, value) == 1
               for param, value in ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1)))
