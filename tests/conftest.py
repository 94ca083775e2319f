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
