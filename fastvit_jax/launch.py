"""Run one command as N JAX processes on this machine (tests, and hosts without a cluster manager).

    python -m fastvit_jax.launch --num_processes 2 --devices_per_process 2 -- \\
        train_tpu.py --variant t8 --dataset demo --workdir runs/mp ...

Every process gets ``JAX_COORDINATOR_ADDRESS`` (127.0.0.1 and a free port),
``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, which ``train_tpu.py`` passes to
``jax.distributed.initialize``. ``--devices_per_process N`` gives every process N CPU
devices (``XLA_FLAGS=--xla_force_host_platform_device_count=N``, ``JAX_PLATFORMS=cpu``, and
at least 4N threads for them, ``PJRT_NPROC``: ``cpu_pool_for_collectives``).
Output lines are prefixed with ``[pI]``. When a process fails, the others get
``--grace_s`` seconds to notice it and exit on their own, then they are killed. SIGTERM or
SIGINT to the launcher is passed on to every process (the trainer saves a checkpoint). The
exit status is the worst one: a process killed by signal S counts as 128 + S. When process 0
(JAX's coordinator) fails first, the others cannot go on (JAX aborts them, status 134); the
launcher then says so in one line with the command that resumes the run.

On SLURM, Cloud TPU pods and Open MPI, do not use this: run the command once per host
(``srun``, ``gcloud ... ssh --worker=all``, ``mpirun``); JAX detects the cluster itself
(docs/multihost.md).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import IO, Dict, List, Mapping, Optional, Sequence

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
CPU_POOL_ENV = "PJRT_NPROC"  # XLA:CPU's thread pool size, read when JAX creates its CPU client
POOL_THREADS_PER_DEVICE = 4
POLL_S = 0.2


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_device_count(xla_flags: str, devices: int) -> str:
    """``xla_flags`` with the fake CPU device count set to ``devices`` (replacing any given)."""
    kept = re.sub(rf"{DEVICE_COUNT_FLAG}=\S*", "", xla_flags).split()
    return " ".join(kept + [f"{DEVICE_COUNT_FLAG}={devices}"])


def fake_device_count(xla_flags: str) -> int:
    """The CPU device count that ``xla_flags`` asks for (1 when it does not)."""
    counts = re.findall(rf"{DEVICE_COUNT_FLAG}=(\d+)", xla_flags)
    return int(counts[-1]) if counts else 1


def cpu_pool_for_collectives(env: Mapping[str, str]) -> Dict[str, str]:
    """What to add to ``env`` so that collectives between fake CPU devices do not run out of threads:
    ``{PJRT_NPROC: max(cores, 4 x devices)}``; nothing with one device or when ``env`` sets PJRT_NPROC.

    XLA:CPU runs the programs of all of a process's CPU devices on one thread pool of
    max(cores, devices) threads, and a collective (the gradient all-reduce, BatchNorm's batch
    statistics) holds its thread until every device has joined it. When collectives hold all
    the threads while the devices they wait for have none left to run on, the step stops, and
    XLA aborts the process after 40 s ("Termination timeout for all reduce ... Expected 8
    threads to join the rendezvous, but only 7 of them arrived"). It happened on 2 cores with
    8 devices, with other work on the machine; 4 threads per device leaves threads free."""
    devices = fake_device_count(env.get("XLA_FLAGS", ""))
    if devices <= 1 or CPU_POOL_ENV in env:
        return {}
    return {CPU_POOL_ENV: str(max(os.cpu_count() or 1, POOL_THREADS_PER_DEVICE * devices))}


def fake_cpu_devices(env: Mapping[str, str], devices: int) -> Dict[str, str]:
    """``env`` with ``devices`` fake CPU devices (XLA_FLAGS) and a thread pool sized for them."""
    out = dict(env, XLA_FLAGS=with_device_count(env.get("XLA_FLAGS", ""), devices))
    out.update(cpu_pool_for_collectives(out))
    return out


def process_env(base: dict, *, process_id: int, num_processes: int, address: str,
                devices_per_process: Optional[int]) -> dict:
    """The environment of process ``process_id``."""
    env = dict(base, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(num_processes),
               JAX_PROCESS_ID=str(process_id), PYTHONUNBUFFERED="1")
    if devices_per_process:
        env = fake_cpu_devices(env, devices_per_process)
        env["JAX_PLATFORMS"] = "cpu"
    return env


def command_line(command: Sequence[str]) -> List[str]:
    """A ``*.py`` script runs with this Python; anything else as given."""
    command = list(command)
    if command and command[0].endswith(".py"):
        return [sys.executable, *command]
    return command


def exit_status(returncode: int) -> int:
    """A child's status as a shell reports it: killed by signal S -> 128 + S."""
    return 128 - returncode if returncode < 0 else returncode


def _relay(stream: IO[str], prefix: str, out: IO[str], lock: threading.Lock) -> None:
    for line in iter(stream.readline, ""):
        with lock:
            out.write(prefix + line if line.endswith("\n") else prefix + line + "\n")
            out.flush()
    stream.close()


def coordinator_lost_message(first_failed: Optional[int], statuses: Sequence[int], rerun: str) -> Optional[str]:
    """One line when process 0 failed first and took the others down with it, else None."""
    if first_failed != 0 or len(statuses) < 2:
        return None
    return (f"[launch] error: process 0 (JAX's coordinator) stopped first, with status {statuses[0]}; the other "
            f"processes cannot continue without it (JAX aborts them: status 134). Rerun the same command to resume "
            f"from the newest checkpoint: {rerun}")


def launch(command: Sequence[str], *, num_processes: int, devices_per_process: Optional[int] = None,
           port: Optional[int] = None, grace_s: float = 30.0, out: IO[str] = sys.stdout,
           rerun: Optional[str] = None) -> int:
    """Runs ``command`` as ``num_processes`` JAX processes; returns the worst exit status.

    ``rerun``: the command line that restarts the job, named when the coordinator is lost.
    """
    address = f"127.0.0.1:{port or free_port()}"
    lock = threading.Lock()
    procs: List[subprocess.Popen] = []
    relays: List[threading.Thread] = []
    for pid in range(num_processes):
        env = process_env(os.environ, process_id=pid, num_processes=num_processes, address=address,
                          devices_per_process=devices_per_process)
        proc = subprocess.Popen(command_line(command), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, errors="replace", bufsize=1)
        procs.append(proc)
        with lock:
            out.write(f"[launch] process {pid} of {num_processes}: pid {proc.pid}, coordinator {address}\n")
            out.flush()
        relay = threading.Thread(target=_relay, args=(proc.stdout, f"[p{pid}] ", out, lock), daemon=True)
        relay.start()
        relays.append(relay)

    def forward(signum, frame):  # noqa: ARG001  (signal handler signature)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    first_failed: Optional[int] = None
    try:
        deadline = None
        while [p.poll() for p in procs].count(None):  # polls every process (any() would stop at the first)
            failed = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if failed and deadline is None:
                first_failed = failed[0]
                deadline = time.monotonic() + grace_s
                status = exit_status(procs[failed[0]].returncode)
                with lock:
                    out.write(f"[launch] process {failed[0]} exited with status {status}; "
                              f"the others get {grace_s:g}s to stop\n")
                    out.flush()
            if deadline is not None and time.monotonic() > deadline:
                for i, p in enumerate(procs):
                    if p.poll() is None:
                        with lock:
                            out.write(f"[launch] killing process {i} (still running {grace_s:g}s after a failure)\n")
                            out.flush()
                        p.kill()
                break
            time.sleep(POLL_S)
        for p in procs:
            p.wait()
        for relay in relays:
            relay.join(timeout=5)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    statuses = [exit_status(p.returncode) for p in procs]
    lost = coordinator_lost_message(first_failed, statuses, rerun or shlex.join(command_line(command)))
    with lock:
        out.write(f"[launch] exit statuses {statuses}\n" + (f"{lost}\n" if lost else ""))
        out.flush()
    return max(statuses)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fastvit_jax.launch", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True, help="JAX processes to start")
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="CPU devices per process (fake host devices); default: the platform's own devices")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--grace_s", type=float, default=30.0,
                        help="after a process fails, seconds the others get to exit before they are killed")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command, e.g. train_tpu.py ...")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        print("error: no command given; usage: python -m fastvit_jax.launch --num_processes N -- train_tpu.py ...",
              file=sys.stderr)
        return 2
    if args.num_processes < 1:
        print(f"error: --num_processes must be positive, got {args.num_processes}", file=sys.stderr)
        return 2
    rerun = shlex.join([sys.executable, "-m", "fastvit_jax.launch", *(sys.argv[1:] if argv is None else argv)])
    return launch(command, num_processes=args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port, grace_s=args.grace_s, rerun=rerun)


if __name__ == "__main__":
    sys.exit(main())
