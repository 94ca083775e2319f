"""Shared pytest setup.

JAX reads XLA_FLAGS once, when its backend initialises: fake 8 CPU devices here, before
any test module imports jax, so sharding tests see a real 8-device mesh (with the thread pool
``fastvit_jax.launch.cpu_pool_for_collectives`` sizes for them).
"""

import os

from fastvit_jax.launch import DEVICE_COUNT_FLAG, cpu_pool_for_collectives, with_device_count

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = with_device_count(os.environ.get("XLA_FLAGS", ""), 8)
os.environ.update(cpu_pool_for_collectives(os.environ))  # also for a device count set by the caller

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tmp_session_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("session")


def pytest_configure(config):
    """Each xdist worker gets its share of the cores, and every compile goes to a persistent XLA
    cache shared by the workers and the trainer subprocesses.

    - PyTorch's OpenMP threads and TensorFlow's pools spin while they wait for work, so two
      workers of 2 threads each on 2 cores burn the time of the other: the torch_ref tests took
      124 CPU-seconds that way against 32 with one thread per worker (``-n 2``, 2-core Xeon).
    - The cache keeps compiles of any length (the small eager ones too), so a module or a
      subprocess reads what another already compiled (-9% on the load_model tests)."""
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers > 0:  # set in the controller, before the workers start
        share = str(max(1, (os.cpu_count() or 1) // workers))
        for name in ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
            os.environ.setdefault(name, share)
    cache = os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR", os.path.join(os.path.dirname(os.path.dirname(__file__)), ".jax_cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
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


DURATIONS_FILE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "build",
                              "test-durations.txt")


def pytest_addoption(parser):
    parser.addoption("--durations-file", default=DURATIONS_FILE,
                     help="where the suite writes its wall time, outcome and slowest tests (default: %(default)s)")


def pytest_sessionstart(session):
    import time

    session.config._suite_started = time.time()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Writes build/test-durations.txt, or --durations-file (the README cites both): the suite's wall
    time, its outcome and its 15 slowest tests (setup + call + teardown, summed per test). On the
    xdist controller only."""
    import time

    if os.environ.get("PYTEST_XDIST_WORKER") or not hasattr(config, "_suite_started"):
        return
    per_test: dict = {}
    counts: dict = {}
    per_worker: dict = {}
    for outcome, reports in terminalreporter.stats.items():
        for report in reports:
            if getattr(report, "when", None) is None or not hasattr(report, "duration"):
                continue
            per_test[report.nodeid] = per_test.get(report.nodeid, 0.0) + report.duration
            worker = getattr(getattr(getattr(report, "node", None), "gateway", None), "id", "main")
            per_worker[worker] = per_worker.get(worker, 0.0) + report.duration
            if report.when == "call" or (report.when == "setup" and outcome in ("skipped", "error")):
                counts[outcome] = counts.get(outcome, 0) + 1
    wall = time.time() - config._suite_started
    workers = getattr(config.option, "numprocesses", None) or 1
    lines = [f"pytest {' '.join(config.invocation_params.args)}",
             f"wall {wall:.0f} s on {os.cpu_count()} CPUs, {workers} worker(s); exit status {int(exitstatus)}; "
             + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
             f"test time summed over workers: {sum(per_test.values()):.0f} s ("
             + ", ".join(f"{w} {t:.0f} s" for w, t in sorted(per_worker.items())) + ")",
             "", "15 slowest tests (setup + call + teardown):"]
    ranked = sorted(per_test.items(), key=lambda kv: -kv[1])
    lines += [f"{seconds:8.1f} s  {nodeid}" for nodeid, seconds in ranked[:15]]
    lines += ["", "every test:"] + [f"{seconds:8.1f} s  {nodeid}" for nodeid, seconds in ranked]
    path = os.path.abspath(config.getoption("durations_file"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    terminalreporter.write_line(f"durations: {os.path.relpath(path)}")
