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
