"""fastvit_jax.host_memory: glibc malloc settings applied in a fresh process, before JAX starts."""

import subprocess
import sys
import textwrap

import pytest

from fastvit_jax import host_memory

_PROBE = textwrap.dedent("""
    import resource, sys
    from fastvit_jax import host_memory
    applied = host_memory.keep_freed_host_memory(sys.argv[1])
    import jax, jax.numpy as jnp
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(0) + jnp.sin(x).sum(0))
    x = jnp.ones((3000, 3000), jnp.float32)  # 36 MB buffers: above glibc's mmap threshold
    for _ in range(3):
        f(x).block_until_ready()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        f(x).block_until_ready()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5
    print(bool(applied), faults, host_memory.describe())
""")


def _probe(mode):
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    applied, faults, desc = out.stdout.split(maxsplit=2)
    return applied == "True", float(faults), desc.strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_tuned_malloc_stops_per_call_page_faults():
    applied, faults_tuned, desc = _probe("tuned")
    assert applied and desc.startswith("malloc tuned (M_ARENA_MAX=1")
    not_applied, faults_default, desc = _probe("default")
    assert not not_applied and desc == "glibc malloc defaults"
    # each call maps fresh pages for its 36 MB temporaries under glibc's defaults (~9000 faults)
    assert faults_default > 2000 and faults_tuned < 0.1 * faults_default, (faults_tuned, faults_default)


def test_modes_and_late_calls(monkeypatch):
    monkeypatch.setenv(host_memory.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="auto, tuned, default"):
        host_memory.should_tune()
    monkeypatch.setenv(host_memory.ENV_VAR, "default")
    assert host_memory.should_tune() is False and host_memory.should_tune("tuned") is True
    monkeypatch.delenv(host_memory.ENV_VAR)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_memory.should_tune() is True
    # in this test process JAX is already imported: the settings would not reach its threads
    import jax  # noqa: F401
    assert host_memory.keep_freed_host_memory("tuned") is None
