"""flaxclf.runtime.hostmem: with it, a jitted call after the first page-faults none of its temporaries; without
it, every call faults all of them afresh (why the `flaxclf` command turns it on). Each case runs in a fresh
process, since malloc's settings are the process's and must come before the first computation."""

import json
import os
import platform
import subprocess
import sys

import pytest

from flaxclf.runtime import hostmem

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's malloc's")

# Twelve calls of a jitted function with ~200 MB of temporaries (three unfused cumsums of a 64 MB array); the
# minor page faults of each call, in units of the temporaries' pages.
PROGRAM = """
import json, resource, time
from flaxclf.runtime.hostmem import keep_freed_memory
took = keep_freed_memory()
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.cumsum(jnp.cumsum(jnp.cumsum(x, 0)[::-1], 1) * jnp.cumsum(x, 0), 0).sum())
x = jnp.ones((4096, 4096), jnp.float32)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults, values = [], []
for _ in range(12):
    time.sleep(0.05)  # lets XLA's thread free the previous call's temporaries, as a training loop's host work does
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    values.append(float(f(x)))
    faults.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * resource.getpagesize() / temp)
print(json.dumps({"took": took, "temp_mb": temp / 2**20, "faults": faults, "values": values}))
"""


def _run(keep: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device
    env["FLAXCLF_KEEP_FREED_MEMORY"] = "1" if keep else "0"
    p = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def test_calls_after_the_first_fault_no_temporaries():
    kept, default = _run(keep=True), _run(keep=False)
    assert kept["took"] is True and default["took"] is False
    assert kept["temp_mb"] > 100, kept  # big enough that glibc would mmap it (its ceiling is 32 MB)
    # Without the setting every call faults its temporaries in again (a page once per call at least) ...
    assert min(default["faults"]) > 0.9, default
    # ... with it, the first call does and the rest reuse the heap it grew. (XLA's thread frees a call's
    # temporaries just after its result is ready; a call dispatched before that grows the heap by one more set,
    # which is then reused too. Back to back with no pause, 3 of 11 calls did so here; the 50 ms pause, less
    # than a training loop's host work between steps, keeps the count a measure of reuse, not of that race.)
    later = sorted(kept["faults"][1:])
    assert kept["faults"][0] > 0.9 and later[len(later) // 2] < 0.01 and sum(later) < 5, kept
    assert kept["values"] == default["values"]  # the same computation, bit for bit


CAP_PROGRAM = """
import json, sys, time
import numpy as np
from flaxclf.runtime import hostmem
took = hostmem.keep_freed_memory()
base = hostmem.resident_bytes()
big = np.ones(400 * 2**20, np.uint8)  # touched: resident
pin = np.ones(1000, np.uint8)  # a small block after it: the freed big one is a hole, not the heap's top
del big
held = hostmem.resident_bytes()
cap = hostmem.cap_heap(base + 100 * 2**20) if sys.argv[1] == "cap" else None
time.sleep(1.0)
print(json.dumps({"took": took, "base": base, "held": held, "after": hostmem.resident_bytes(),
                  "trims": cap.trims if cap else 0}))
"""


@pytest.mark.parametrize("capped", [False, True])
def test_the_cap_gives_a_freed_hole_back_and_nothing_else_does(capped):
    """A kept heap holds a freed 400 MB block for good (the trade keep_freed_memory makes); a HeapCap below that
    hands it back to the kernel within a second."""
    p = subprocess.run([sys.executable, "-c", CAP_PROGRAM, "cap" if capped else "none"], capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads(p.stdout.strip().splitlines()[-1])
    mb = 2**20
    assert r["took"] and r["held"] - r["base"] > 390 * mb  # freed, yet resident
    if capped:
        assert r["trims"] >= 1 and r["after"] - r["base"] < 100 * mb
    else:
        assert r["after"] - r["base"] > 390 * mb


def test_a_cap_inside_a_steps_working_set_rises_above_it_and_trims_are_spaced():
    """Trims that give back what the steps fault in again raise the cap above the working set, and it trims no
    more: a trim that leaves the resident memory within the margin of the cap (taken during a step), or one whose
    memory is back within `spacing` seconds (taken between steps), however little above the cap. A heap that
    grows past both is trimmed at once, and memory that takes longer than `spacing` to come back is trimmed again,
    the cap kept where it is."""
    gb, margin = 10**9, 256 * 2**20
    thrash = hostmem.HeapCap(2 * gb, margin=margin, spacing=0.0)
    for step in range(5):  # each step: 2.3 GB resident, 1.9 GB of it in use
        thrash.look(int(2.3 * gb), trim=lambda: int(1.9 * gb), now=step)
    assert (thrash.trims, thrash.raises, thrash.limit, thrash.start_limit) == (1, 1, int(2.3 * gb) + margin, 2 * gb)

    between = hostmem.HeapCap(2 * gb, margin=margin, spacing=10.0)
    # a look every second; steps fault 2.4 GB in, and a trim between two steps gives 1.1 GB back, which the next
    # steps fault in again: the second look past the cap raises it instead of trimming
    for t in range(20):
        between.look(int(2.4 * gb), trim=lambda: int(1.3 * gb), now=float(t))
    assert (between.trims, between.raises, between.limit) == (1, 1, int(2.4 * gb) + margin)

    # The packed main job (a look every second, 2026-12-08): the steps hold 2.10-2.18 GB against a cap of 2.08
    # GB, less than the margin above it, and each trim gave 0.95 GB back that the next step faulted in again; the
    # cap trimmed every 10 s until this rule raised it at the first look after a trim.
    slightly = hostmem.HeapCap(int(2.08 * gb), margin=margin, spacing=10.0)
    for t in range(60):
        resident = (2.10, 2.16, 2.18)[t % 3]
        slightly.look(int(resident * gb), trim=lambda resident=resident: int((resident - 0.95) * gb), now=float(t))
    assert (slightly.trims, slightly.raises, slightly.limit) == (1, 1, int(2.16 * gb) + margin)

    holes = hostmem.HeapCap(2 * gb, margin=margin, spacing=10.0)
    # a look every 3 s; each trim gives 1.1 GB back. 1.9 GB after an evaluation, 2.2 GB again 12 s after the trim
    # at 3 s: trimmed again. 2.2 GB after a trim at 2.2 GB, 3 s later: a raise to 2.2 GB + margin. 3 GB, past
    # the margin above both the cap and where the last trim started: trimmed at once.
    for step, resident in enumerate((1.5, 2.2, 1.9, 1.9, 1.9, 2.2, 2.2, 3.0)):
        holes.look(int(resident * gb), trim=lambda resident=resident: int((resident - 1.1) * gb), now=3.0 * step)
    assert (holes.trims, holes.raises, holes.limit) == (3, 1, int(2.2 * gb) + margin)  # at 3 s, 15 s and 21 s

    big = hostmem.HeapCap(2 * gb, margin=margin, spacing=0.0)  # a step's own memory is above the cap
    for step in range(3):
        big.look(3 * gb, trim=lambda: int(2.95 * gb), now=step)
    assert (big.trims, big.raises, big.limit) == (1, 1, 3 * gb + margin)
    big.stop()  # never started: nothing to stop
