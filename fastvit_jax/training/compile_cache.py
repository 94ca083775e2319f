"""Compile once: JAX's persistent compilation cache.

With the cache on, a restart or ``--eval_only`` loads the compiled train step from disk
instead of compiling it again (about a minute for FastViT-t8 on CPU). The default
location is ``$JAX_COMPILATION_CACHE_DIR`` or ``~/.cache/fastvit_jax/jax``; it is shared
by every run of the same user and machine (entries are keyed by the program, the jax
version and the devices). ``--compilation_cache_dir none`` turns it off.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from typing import Iterator, List, Optional

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

log = logging.getLogger("fastvit_jax.training")

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "fastvit_jax", "jax")
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


def resolve_cache_dir(configured: Optional[str]) -> Optional[str]:
    """--compilation_cache_dir -> a directory, or None when the cache is off."""
    if configured is not None:
        return None if configured.lower() in ("", "none", "off") else os.path.expanduser(configured)
    return os.path.expanduser(os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE_DIR)


def enable_compilation_cache(configured: Optional[str]) -> Optional[str]:
    """Points JAX's persistent cache at the configured directory (every entry is kept).

    Returns the directory, or None when the cache is off.
    """
    directory = resolve_cache_dir(configured)
    current = jax.config.jax_compilation_cache_dir
    if directory != current:
        compilation_cache.set_cache_dir(directory)
        compilation_cache.reset_cache()  # the cache is set up once per process; redo it
    if directory is not None:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


@contextlib.contextmanager
def count_cache_hits() -> Iterator[List[int]]:
    """Counts persistent-cache hits of the compilations run inside the block: ``hits[0]``."""
    hits = [0]

    def on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            hits[0] += 1

    monitoring.register_event_listener(on_event)
    try:
        yield hits
    finally:
        monitoring.unregister_event_listener(on_event)


@contextlib.contextmanager
def announce_compilation(what: str, cache_dir: Optional[str], every_s: float = 30.0) -> Iterator[None]:
    """Logs that ``what`` is being compiled (and whether the cache keeps it), then every ``every_s``
    seconds how long it has taken, until the block ends: a long compile is never silent."""
    kept = (f"it is kept in the compilation cache ({cache_dir}) for the next start" if cache_dir
            else "the compilation cache is off (--compilation_cache_dir), so the next start compiles again")
    log.info("compiling %s (minutes on a CPU host, unless it is in the cache); %s", what, kept)
    done = threading.Event()
    start = time.perf_counter()

    def tick() -> None:
        while not done.wait(every_s):
            log.info("still compiling %s (%.0fs so far)", what, time.perf_counter() - start)

    ticker = threading.Thread(target=tick, daemon=True, name="compile-progress")
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
