"""SIGTERM (preemption) and Ctrl-C as a flag the trainer polls; every process agrees on it.

From the start of a run to its end (compilation, the loop, the final evaluation and export),
SIGTERM and SIGINT set a flag instead of killing the process: the loop then saves a
checkpoint and stops (exit 0); before the first step or after the last, there is nothing new
to save and the trainer stops at the next point where it looks. A second Ctrl-C more than
``FORCE_AFTER_S`` seconds after the first raises KeyboardInterrupt (nothing more is saved);
repeats within that time are the same keypress delivered twice (by the terminal to the
process group and by ``fastvit_jax.launch``, which forwards it).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Dict, Optional

import jax
import numpy as np

log = logging.getLogger("fastvit_jax.training")

FORCE_AFTER_S = 2.0
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignals:
    """Context manager: while inside, SIGTERM / SIGINT set a flag (main thread only); old handlers restored."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous: Dict[int, object] = {}
        self._first_interrupt: Optional[float] = None
        self.name: Optional[str] = None  # of the first signal received

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        return self

    def _on_signal(self, signum, frame) -> None:
        now = time.monotonic()
        if signum == signal.SIGINT:
            if self._first_interrupt is not None and now - self._first_interrupt > FORCE_AFTER_S:
                raise KeyboardInterrupt
            self._first_interrupt = self._first_interrupt or now
        if not self._flag.is_set():
            self.name = signal.Signals(signum).name
            log.warning("%s received: will checkpoint and stop at the next safe point (a second Ctrl-C aborts "
                        "without saving)", self.name)
        self._flag.set()

    def __exit__(self, *exc) -> bool:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        return False

    def is_set(self) -> bool:
        """True when any process received a stop signal (a collective when there are several processes)."""
        if jax.process_count() > 1:  # every process must agree, or the collective save hangs
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([self._flag.is_set()], np.int32))
            return bool(np.asarray(flags).any())
        return self._flag.is_set()
