"""Shared pytest setup.

JAX reads XLA_FLAGS once, when its backend initialises: fake 8 CPU devices here, before
any test module imports jax, so sharding tests see a real 8-device mesh.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


def pytest_configure(config):
    """A persistent XLA compilation cache shared by the xdist workers and trainer subprocesses."""
    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
    os.makedirs(cache, exist_ok=True)


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    """One xdist worker runs many modules: drop their cached models and compilations in between
    (without this a worker grew past 11 GB over the parity, MobileCLIP and export modules)."""
    yield
    import gc
    import sys

    helpers = sys.modules.get("helpers")
    for name in ("torch_model", "torch_fused", "jax_apply"):
        cached = getattr(helpers, name, None)
        if cached is not None:
            cached.cache_clear()
    if "jax" in sys.modules:
        sys.modules["jax"].clear_caches()
    gc.collect()
