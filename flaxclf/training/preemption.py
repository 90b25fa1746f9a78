"""Preemption: the first SIGTERM or SIGINT lets the step finish and the checkpoint complete, then the run exits
with 128 + the signal; a second one exits at once. With several processes they agree on stopping."""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from jax.experimental import multihost_utils

PREEMPTED_EXIT_CODE = {signal.SIGTERM: 143, signal.SIGINT: 130}  # 128 + signal, after a complete checkpoint


class Preempted(SystemExit):
    """Raised after a signal once the checkpoint is complete; its code is PREEMPTED_EXIT_CODE[signal]."""


class Signals:
    """First SIGTERM/SIGINT: finish the step, save, exit. A second one exits at once."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        if _main_thread():  # signal handlers can only be installed from the main thread
            for sig in PREEMPTED_EXIT_CODE:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, _frame):
        if self.received is not None:
            os._exit(128 + signum)
        self.received = signum

    def __exit__(self, *_):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def any_process(local: bool, step: int, every: int) -> bool:
    """Whether any process received a stop signal. With several processes they agree every `every` steps
    (a collective each step would stall async dispatch); one process answers at once."""
    if jax.process_count() == 1:
        return local
    if step % every:
        return False
    return bool(multihost_utils.process_allgather(np.array(local)).any())
