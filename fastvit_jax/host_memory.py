"""Keep freed host memory inside the process, so CPU runs stop page-faulting every buffer.

XLA:CPU allocates an executable's temporary buffers on every call and frees them after it.
glibc hands large blocks (and every block malloc'd from a worker thread's arena) to the
kernel with ``munmap`` on free, so the next call maps fresh pages and the kernel zeroes each
4 KiB page again on first touch. Measured on 2 cores (t8, batch 8, 256 px): 18,600 minor page
faults per fused forward call and 600,000 per training step; the forward ran 1.26x faster and
the training step 1.35x faster with the settings below (0 faults per call). PyTorch's CPU
allocator sits on the same malloc and gains as much (fused t8 channels_last 1.31x), so
benchmarks compare the two frameworks under one setting (docs/performance.md#host-memory-on-cpu).

The settings (``mallopt``): one malloc arena for all threads (``M_ARENA_MAX=1``: large
blocks then come from the main heap), no ``mmap`` for large blocks (``M_MMAP_MAX=0``), and no
trimming of the heap's top (``M_TRIM_THRESHOLD=-1``). The cost: the process keeps its peak
heap resident, and all threads share one arena lock (a host feeding an accelerator from many
input-pipeline threads may prefer glibc's defaults; see ``should_tune``).

They only take effect when applied before JAX (or PyTorch) starts its thread pools: call
``keep_freed_host_memory()`` first thing in a script, before ``import jax``. The entry points of
this project (``train_tpu.py``, ``fastvit_jax.demo``, ``benchmarks``) do. The environment
variable ``FASTVIT_HOST_MALLOC=default`` turns it off, ``=tuned`` forces it on.

This module imports neither JAX nor PyTorch.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import os
import sys
from typing import Dict, Optional

# glibc <malloc.h> parameter numbers
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

ENV_VAR = "FASTVIT_HOST_MALLOC"
MODES = ("auto", "tuned", "default")
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")

_applied: Optional[Dict[str, int]] = None


def _libc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") else None


def accelerator_plugin_installed() -> bool:
    """True if a JAX TPU/GPU plugin is importable (checked without importing JAX)."""
    return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def should_tune(mode: Optional[str] = None) -> bool:
    """Whether to apply the settings: ``mode`` (or ``$FASTVIT_HOST_MALLOC``, default 'auto').

    'auto' tunes CPU-only runs: JAX_PLATFORMS is 'cpu', or no TPU/GPU plugin is installed.
    """
    mode = (mode or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"{ENV_VAR}={mode!r} is not one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "tuned"
    return os.environ.get("JAX_PLATFORMS", "").strip().lower() == "cpu" or not accelerator_plugin_installed()


def keep_freed_host_memory(mode: Optional[str] = None) -> Optional[Dict[str, int]]:
    """Apply the glibc malloc settings above if ``should_tune(mode)``; idempotent.

    Returns the settings applied (``{'M_ARENA_MAX': 1, ...}``), or None when nothing was
    applied: turned off, not glibc, a ``mallopt`` call failed, or JAX/PyTorch is already
    imported (their threads would keep their own arenas, so the settings would not help).
    """
    global _applied
    if _applied is not None:
        return _applied
    if not should_tune(mode) or any(name in sys.modules for name in ("jaxlib", "torch")):
        return None
    libc = _libc()
    if libc is None:
        return None
    settings = {"M_ARENA_MAX": (M_ARENA_MAX, 1), "M_MMAP_MAX": (M_MMAP_MAX, 0),
                "M_TRIM_THRESHOLD": (M_TRIM_THRESHOLD, -1)}
    for param, value in settings.values():
        if libc.mallopt(param, value) != 1:  # mallopt returns 1 on success
            return None
    _applied = {name: value for name, (_, value) in settings.items()}
    return _applied


def describe() -> str:
    """One line for logs and benchmark reports."""
    if _applied is None:
        return "glibc malloc defaults"
    return "malloc tuned (" + ", ".join(f"{k}={v}" for k, v in _applied.items()) + ")"
