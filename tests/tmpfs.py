"""Real full and read-only file systems for the tests: a tmpfs mounted in a user + mount namespace.

``unshare -rm`` gives the command its own mount namespace (as a mapped root), so a tmpfs can
be mounted without privileges on the host and disappears with the command.
"""

import os
import shutil
import subprocess

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tmpfs_unavailable(scratch) -> str:
    """'' when ``unshare -rm`` can mount a tmpfs on this machine, else the reason (for pytest.skip)."""
    if shutil.which("unshare") is None:
        return "no unshare(1) on this machine"
    probe = os.path.join(scratch, "tmpfs-probe")
    os.makedirs(probe, exist_ok=True)
    r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {probe}"],
                       capture_output=True, text=True)
    return "" if r.returncode == 0 else f"cannot mount a tmpfs in a user namespace: {r.stderr.strip()}"


def cli_env() -> dict:
    """The environment of a CLI run by a test: the repository importable, CPU, no FASTVIT_DEBUG
    (the tests assert that no traceback is printed)."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("FASTVIT_DEBUG", None)
    return env


def run_with_tmpfs(script: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``sh -c script`` in a new user + mount namespace (the script mounts what it needs)."""
    return subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, env=cli_env(),
                          timeout=timeout)
