"""SIGTERM (preemption) as a flag the training loop polls; every process agrees on it."""

from __future__ import annotations

import logging
import signal
import threading

import jax
import numpy as np

log = logging.getLogger("fastvit_jax.training")


class SigtermFlag:
    """Context manager: while inside, SIGTERM sets a flag (main thread only); the old handler is restored."""

    def __init__(self):
        self._flag = threading.Event()
        self._previous_handler = None

    def __enter__(self) -> "SigtermFlag":
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        return self

    def _on_sigterm(self, signum, frame) -> None:
        log.warning("SIGTERM received: will checkpoint and stop after the current step")
        self._flag.set()

    def __exit__(self, *exc) -> bool:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        return False

    def is_set(self) -> bool:
        """True when any process received SIGTERM (a collective when there are several processes)."""
        if jax.process_count() > 1:  # every process must agree, or the collective save hangs
            from jax.experimental import multihost_utils

            flags = multihost_utils.process_allgather(np.array([self._flag.is_set()], np.int32))
            return bool(np.asarray(flags).any())
        return self._flag.is_set()
