"""Quiet native start-up logs for the command-line entry points.

Loading TensorFlow prints lines from its C++ runtime (the oneDNN notice, twice, and absl's
"All log messages before absl::InitializeLog()" banner) that ``TF_CPP_MIN_LOG_LEVEL`` no longer
hides (TF 2.21) and that ask nothing of the user. ``train_tpu.py``, ``predict``, ``export`` and
``demo`` call ``quiet_native_logs()`` once their flags are parsed: it loads TensorFlow with the
process's stderr pointed at /dev/null, and sets ``TF_CPP_MIN_LOG_LEVEL=2`` for what comes later.
``FASTVIT_DEBUG=1`` keeps every line. An error while loading is still raised, with its message.
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 -> /dev/null (native libraries write there directly, not to sys.stderr)."""
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def quiet_native_logs() -> None:
    """Loads TensorFlow without its start-up lines (unless FASTVIT_DEBUG is set)."""
    if os.environ.get("FASTVIT_DEBUG"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return
    with _stderr_silenced():
        import tensorflow  # noqa: F401
