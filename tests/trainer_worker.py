"""Runs ``train_tpu.run`` (the CLI's error handling and exit codes) on the tiny test model.

    python tests/trainer_worker.py CONFIG.json [--fill_disk_after STEP --leave_free BYTES]

CONFIG.json: keyword arguments of ``get_config("t8", ...)``. ``--fill_disk_after STEP`` writes
``<workdir>/filler`` after that training step (once the checkpoints written so far are
complete) until the file system has ``--leave_free`` bytes left (the full-disk test runs this
on a small tmpfs). Exits with ``run``'s status.
"""

import argparse
import contextlib
import errno
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train_tpu  # noqa: E402
from fastvit_jax.training.config import get_config  # noqa: E402
from fastvit_jax.training.logs import configure_logging  # noqa: E402
from test_training_helpers import after_each_step, create_tiny_model  # noqa: E402


def fill_disk(path: str, leave_free: int) -> None:
    """Appends to ``path`` until its file system has about ``leave_free`` bytes free."""
    with open(path, "wb") as f:
        while True:
            stat = os.statvfs(os.path.dirname(path))
            free = stat.f_bavail * stat.f_frsize
            chunk = min(1 << 20, free - leave_free)
            if chunk <= 0:
                return
            try:
                f.write(b"\0" * chunk)
                f.flush()
            except OSError as e:
                if e.errno == errno.ENOSPC:
                    return
                raise


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--fill_disk_after", type=int, default=0)
    parser.add_argument("--leave_free", type=int, default=0)
    args = parser.parse_args()
    with open(args.config) as f:
        overrides = json.load(f)
    configure_logging()

    def fill_disk_at(step):
        if step == args.fill_disk_after:
            checkpoints = os.path.join(overrides["workdir"], "checkpoints")
            deadline = time.time() + 120
            while any(".orbax-checkpoint-tmp" in name for name in os.listdir(checkpoints)):
                if time.time() > deadline:
                    raise TimeoutError(f"the async checkpoint in {checkpoints} did not finish")
                time.sleep(0.05)
            fill_disk(os.path.join(overrides["workdir"], "filler"), args.leave_free)

    with after_each_step(fill_disk_at) if args.fill_disk_after else contextlib.nullcontext():
        return train_tpu.run(lambda: get_config("t8", **overrides), model_fn=create_tiny_model)


if __name__ == "__main__":
    sys.exit(main())
