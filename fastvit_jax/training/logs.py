"""How the trainer's entry points (``train_tpu.py``, ``python -m fastvit_jax.demo``) log."""

import logging
import os
import sys

NOISY_LOGGERS = ("absl", "jax._src.xla_bridge", "jax._src.compilation_cache", "orbax", "tensorflow")


def configure_logging() -> None:
    """INFO from this project, warnings from the libraries; without FASTVIT_DEBUG, the tracebacks of
    orbax's failed background writes and abandoned reads are dropped (the trainer reports the error)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not os.environ.get("FASTVIT_DEBUG"):  # errors the trainer reports as one line, not as tracebacks
        from fastvit_jax.training.checkpoint import OrbaxThreadErrors, drop_abandoned_read_callbacks

        for name in ("absl", "asyncio"):
            logging.getLogger(name).addFilter(OrbaxThreadErrors())
        sys.unraisablehook = drop_abandoned_read_callbacks(sys.unraisablehook)
