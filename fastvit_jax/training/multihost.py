"""Several JAX processes: start-up, barriers with a timeout, work done once, a lost peer noticed.

Every coordination here goes through JAX's coordination service (the key-value store and
barriers of ``jax.distributed``), never through a device collective, so it works the same
on TPU, GPU and CPU (gloo) and cannot deadlock a collective.

- ``maybe_initialize_distributed``: ``jax.distributed.initialize`` when the environment
  describes a multi-process job (explicit variables, a Cloud TPU pod slice, SLURM, Open MPI),
  with the join, heartbeat and shutdown timeouts derived from ``--distributed_timeout``.
- ``barrier``: every process waits for the others, at most ``timeout_s``; a timeout is a
  ``MultihostError`` that says what the processes were waiting for.
- ``run_on_process_0``: process 0 does some work (prepare a dataset) while the others wait;
  its failure is raised on every process.
- ``write_topology`` / ``topology_change``: the process and device count a workdir was
  trained with, and a warning when a resume uses another process count (other data order).
- ``PeerWatchdog``: every process counts up a key in the key-value store each second and
  watches the others'; a peer whose counter stops for ``--distributed_timeout`` seconds is
  reported by name and this process exits with ``EXIT_PEER_LOST`` (JAX's own heartbeat,
  set to four times that, would otherwise abort it with a C++ stack trace, later).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from typing import Callable, Dict, Optional

import jax

from fastvit_jax.io import write_text_atomically

log = logging.getLogger("fastvit_jax.training")

EXIT_PEER_LOST = 4  # the exit status of a process whose peer stopped responding or did not arrive
# JAX's heartbeat timeout, in units of --distributed_timeout. A JAX client beats every half of its
# timeout, so the service may declare a dead peer as soon as half the timeout after the death
# (measured with jax 0.10.2, a 20 s timeout: 11.9 to 20.0 s). At 4 that is 2T, well after the
# watchdog's report at T plus a beat; at 2 the two raced and JAX's abort (status 134) could win.
HEARTBEAT_FACTOR = 4
WATCHDOG_INTERVAL_S = 1.0

_DISTRIBUTED_ENV = (
    "JAX_COORDINATOR_ADDRESS",  # explicit multi-process launch (fastvit_jax.launch, plain multi-node)
    "COORDINATOR_ADDRESS",
)


class MultihostError(RuntimeError):
    """Processes of one job did not meet (a barrier timed out, a peer was lost)."""


def want_distributed(env=os.environ) -> bool:
    """Whether the environment describes a job of several processes."""
    if any(env.get(k) for k in _DISTRIBUTED_ENV):
        return True
    # Cloud TPU pod slice: the TPU runtime lists the workers of the slice.
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    if hosts and len([h for h in hosts.split(",") if h.strip()]) > 1:
        return True
    # Multislice / GKE TPU jobs.
    if env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    # SLURM with several tasks (jax auto-detects the cluster).
    if int(env.get("SLURM_NTASKS", "1") or 1) > 1 and env.get("SLURM_JOB_ID"):
        return True
    # Open MPI (mpirun -n N): jax auto-detects it from OMPI_* variables.
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return False


def initialize_kwargs(env=os.environ, *, distributed_timeout_s: float) -> Dict[str, object]:
    """The keyword arguments of ``jax.distributed.initialize`` for this environment."""
    timeout = max(1, int(round(distributed_timeout_s)))
    kwargs: Dict[str, object] = {"initialization_timeout": timeout,
                                 "heartbeat_timeout_seconds": HEARTBEAT_FACTOR * timeout,
                                 "shutdown_timeout_seconds": timeout}
    addr = env.get("JAX_COORDINATOR_ADDRESS") or env.get("COORDINATOR_ADDRESS")
    if addr:
        kwargs["coordinator_address"] = addr
        if env.get("JAX_NUM_PROCESSES"):
            kwargs["num_processes"] = int(env["JAX_NUM_PROCESSES"])
        if env.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(env["JAX_PROCESS_ID"])
    return kwargs


def maybe_initialize_distributed(env=os.environ, *, distributed_timeout_s: float) -> bool:
    """Calls ``jax.distributed.initialize()`` when the environment describes a multi-process job.

    Must run before anything touches the JAX backend. Returns True when it initialised.
    Recognised: JAX_COORDINATOR_ADDRESS (+ JAX_NUM_PROCESSES, JAX_PROCESS_ID), a Cloud TPU
    pod slice (TPU_WORKER_HOSTNAMES with several hosts), MEGASCALE_COORDINATOR_ADDRESS, SLURM
    with several tasks, Open MPI with several ranks. Single-process runs do nothing.
    """
    if not want_distributed(env):
        return False
    kwargs = initialize_kwargs(env, distributed_timeout_s=distributed_timeout_s)
    log.info("jax.distributed.initialize(%s)", kwargs)
    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as e:  # incomplete environment, coordinator unreachable
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MultihostError(
            f"could not join the multi-process job ({first}); set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and "
            f"JAX_PROCESS_ID on every host, or see docs/multihost.md for SLURM, TPU pods and Open MPI") from None
    return True


def _client():
    from jax._src.distributed import global_state

    return global_state.client


def barrier(name: str, timeout_s: float, waiting_for: str) -> None:
    """Waits until every process has called ``barrier(name, ...)``; a no-op on one process.

    A coordination-service barrier (no device collective). Raises MultihostError after
    ``timeout_s`` seconds, naming ``waiting_for`` (e.g. 'the train step to compile').
    """
    if jax.process_count() == 1:
        return
    start = time.monotonic()
    try:
        _client().wait_at_barrier(name, max(1, int(timeout_s * 1000)))
    except Exception as e:  # the client raises a plain XlaRuntimeError carrying the status
        status = (str(e).strip().splitlines() or [type(e).__name__])[0].split(" This usually")[0]
        raise MultihostError(
            f"process {jax.process_index()}: not all {jax.process_count()} processes reached '{name}' "
            f"({waiting_for}) within --barrier_timeout {timeout_s:g}s (this one waited "
            f"{time.monotonic() - start:.0f}s; {status}). A process may have crashed (see its log) or be much "
            f"slower; raise --barrier_timeout if it is only slow"
        ) from None
    log.info("all %d processes reached '%s' (waited %.1fs)", jax.process_count(), name, time.monotonic() - start)


def run_on_process_0(name: str, work: Callable[[], None], *, timeout_s: float, what: str) -> None:
    """``work()`` on process 0 only; the others wait for it (at most ``timeout_s``).

    An exception of ``work`` is raised on process 0 and, as MultihostError with its message,
    on every other process, so all of them stop with the same one-line reason.
    """
    if jax.process_count() == 1:
        work()
        return
    error_key = f"{name}/error"
    if jax.process_index() == 0:
        error: Optional[BaseException] = None
        try:
            work()
        except Exception as e:  # re-raised below, after the others have been told
            error = e
            _client().key_value_set(error_key, f"{e}")
        barrier(name, timeout_s, f"process 0 to {what}")
        if error is not None:
            raise error
        return
    log.info("process %d: waiting for process 0 to %s", jax.process_index(), what)
    barrier(name, timeout_s, f"process 0 to {what}")
    message = _try_get(error_key)
    if message is not None:
        raise MultihostError(f"process 0 failed to {what}: {message}")


TOPOLOGY_FILENAME = "topology.json"


def current_topology() -> Dict[str, int]:
    """{'process_count', 'device_count'} of this job."""
    return {"process_count": jax.process_count(), "device_count": jax.device_count()}


def write_topology(workdir: str) -> None:
    """Records this job's process and device count in ``<workdir>/topology.json`` (process 0)."""
    if jax.process_index() != 0:
        return
    write_text_atomically(os.path.join(workdir, TOPOLOGY_FILENAME), json.dumps(current_topology()))


def topology_change(workdir: str, step: int) -> Optional[str]:
    """A warning when the workdir was trained by another number of processes, else None.

    The data order depends on the process count (each process reads its own
    ``tfds.even_splits`` slice), so the resumed run continues with another order.
    """
    path = os.path.join(workdir, TOPOLOGY_FILENAME)
    if not os.path.exists(path):
        return None
    from fastvit_jax.io import read_json_file

    saved = read_json_file(path, "it only records the process count of the last checkpoint: delete it and rerun "
                                 "(it is rewritten at the next checkpoint)")
    now = current_topology()
    if saved.get("process_count") == now["process_count"]:
        return None
    before, after = _describe(saved), _describe(now)
    return (f"resuming step {step} of a run trained by {before} on {after}: the checkpoint is restored onto the "
            f"new mesh, but the data order from here on is that of {now['process_count']} process(es) (each reads "
            f"its own slice); resume on {saved.get('process_count')} process(es) for the exact order "
            f"(docs/multihost.md)")


def _describe(topology: Dict[str, int]) -> str:
    return f"{topology.get('process_count')} process(es) x {topology.get('device_count')} devices"


def _try_get(key: str) -> Optional[str]:
    try:
        return _client().key_value_try_get(key)
    except Exception:  # NOT_FOUND: the key was never set
        return None


class PeerWatchdog:
    """Notices a process of the job that stopped responding, and ends this one with a message.

    Use as a context manager around the work that needs every process. Each process
    counts up ``fastvit_alive/<id>`` every second; a peer whose counter does not move for
    ``timeout_s`` seconds (or a coordination service that stops answering, when process 0
    is gone) is reported on stderr as ``process N stopped responding ...`` with the hint
    from ``resume_hint()``, and the process exits at once with status EXIT_PEER_LOST (its
    collectives would otherwise wait forever). A process that leaves the block normally
    marks itself done, so the others do not wait for it.
    """

    def __init__(self, timeout_s: float, resume_hint: Callable[[], str] = lambda: ""):
        self.timeout_s = float(timeout_s)
        self.resume_hint = resume_hint
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def __enter__(self) -> "PeerWatchdog":
        if jax.process_count() > 1:
            self._thread = threading.Thread(target=self._run, name="fastvit-peer-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        if exc_type is None:
            _client().key_value_set(f"fastvit_done/{jax.process_index()}", "1")

    def lost_message(self, process: int, silent_s: float) -> str:
        """The line printed when ``process`` has been silent for ``silent_s`` seconds."""
        role = " (the coordinator)" if process == 0 else ""
        hint = self.resume_hint()
        return (f"error: process {process}{role} stopped responding (no heartbeat for {silent_s:.0f}s, "
                f"--distributed_timeout {self.timeout_s:g}); this is process {jax.process_index()} of "
                f"{jax.process_count()}. Rerun the same command on every host to resume{hint}")

    def _run(self) -> None:
        me, count = jax.process_index(), jax.process_count()
        client = _client()
        last_seen: Dict[int, tuple] = {p: (None, time.monotonic()) for p in range(count) if p != me}
        unreachable_since: Optional[float] = None
        beats = 0
        while not self._stop.wait(WATCHDOG_INTERVAL_S):
            now = time.monotonic()
            try:
                beats += 1
                client.key_value_set(f"fastvit_alive/{me}", str(beats), allow_overwrite=True)
                for peer, (value, since) in list(last_seen.items()):
                    if _try_get(f"fastvit_done/{peer}") is not None:
                        del last_seen[peer]
                        continue
                    current = _try_get(f"fastvit_alive/{peer}")
                    if current != value:
                        last_seen[peer] = (current, now)
                    elif now - since > self.timeout_s:
                        self._lost(peer, now - since)
                        return
                unreachable_since = None
            except Exception:  # the coordination service (process 0) does not answer
                unreachable_since = unreachable_since or now
                if me != 0 and now - unreachable_since > self.timeout_s:
                    self._lost(0, now - unreachable_since)
                    return

    def _lost(self, process: int, silent_s: float) -> None:
        print(self.lost_message(process, silent_s), file=sys.stderr, flush=True)
        os._exit(EXIT_PEER_LOST)  # not sys.exit: the main thread may be blocked in a collective
