"""``python -m fastvit_jax.launch``: environment per process, prefixed output, worst exit status,
the others killed after a failure, the thread pool of fake CPU devices (plain Python children and one
JAX process: seconds)."""

import io
import os
import sys
import time

import pytest

from fastvit_jax import launch


def test_each_process_gets_the_coordinator_its_id_and_its_devices():
    env = launch.process_env({"XLA_FLAGS": "--xla_cpu_x=1 --xla_force_host_platform_device_count=8", "A": "b"},
                             process_id=1, num_processes=3, address="127.0.0.1:999", devices_per_process=2)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:999"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["A"]) == ("3", "1", "b")
    assert env["XLA_FLAGS"] == "--xla_cpu_x=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu" and env["PJRT_NPROC"] == str(max(os.cpu_count(), 8))  # 4 per device
    assert "JAX_PLATFORMS" not in launch.process_env({}, process_id=0, num_processes=2, address="h:1",
                                                     devices_per_process=None)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts threads in /proc")
def test_fake_devices_get_four_pool_threads_each():
    """XLA:CPU's pool has max(cores, devices) threads by default; a collective holds its thread
    until every device joins, so with 8 devices on 2 cores a step could wait forever (and XLA
    abort after 40 s). PJRT_NPROC sizes the pool: checked in a real JAX process."""
    import subprocess

    assert launch.cpu_pool_for_collectives({}) == {}  # one device: no collectives
    assert launch.cpu_pool_for_collectives({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) == {
        "PJRT_NPROC": str(max(os.cpu_count(), 32))}  # never fewer threads than cores
    assert launch.cpu_pool_for_collectives({"XLA_FLAGS": "--xla_force_host_platform_device_count=8",
                                            "PJRT_NPROC": "9"}) == {}  # the user's own setting stays
    code = ("import glob, jax\n(jax.numpy.ones(8) + 1).block_until_ready()\n"
            "print(sum('XLAEigen' in open(f).read() for f in glob.glob('/proc/self/task/*/comm')))")
    env = launch.fake_cpu_devices({k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PJRT_NPROC")}, 4)
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, JAX_PLATFORMS="cpu"), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert int(r.stdout.split()[-1]) == max(os.cpu_count(), 16)


def test_scripts_run_with_this_python_and_signals_count_as_128_plus():
    assert launch.command_line(["train_tpu.py", "--x"]) == [sys.executable, "train_tpu.py", "--x"]
    assert launch.command_line(["echo", "hi"]) == ["echo", "hi"]
    assert launch.exit_status(-9) == 137 and launch.exit_status(3) == 3


def test_output_is_prefixed_and_the_worst_status_wins():
    out = io.StringIO()
    code = "import os; pid = os.environ['JAX_PROCESS_ID']; print('hello from', pid); raise SystemExit(int(pid) * 3)"
    status = launch.launch([sys.executable, "-c", code], num_processes=2, grace_s=30, out=out)
    text = out.getvalue()
    assert status == 3
    assert "[p0] hello from 0\n" in text and "[p1] hello from 1\n" in text
    assert "[launch] exit statuses [0, 3]" in text


def test_the_others_are_killed_when_one_fails_and_they_do_not_stop():
    out = io.StringIO()
    code = "import os, time; pid = os.environ['JAX_PROCESS_ID']\nif pid == '1': raise SystemExit(5)\ntime.sleep(120)"
    start = time.monotonic()
    status = launch.launch([sys.executable, "-c", code], num_processes=2, grace_s=1, out=out)
    assert time.monotonic() - start < 30
    assert status == 137, out.getvalue()
    assert "[launch] process 1 exited with status 5; the others get 1s to stop" in out.getvalue()
    assert "[launch] killing process 0" in out.getvalue()
    assert "[launch] exit statuses [137, 5]" in out.getvalue()


def test_no_command_is_a_one_line_error(capsys):
    assert launch.main(["--num_processes", "2"]) == 2
    assert "no command given" in capsys.readouterr().err


def test_a_lost_coordinator_is_one_line_with_the_command_to_resume():
    """Process 0 fails first and JAX aborts the other (134): one line naming it and the rerun command."""
    out = io.StringIO()
    code = ("import os, time; pid = os.environ['JAX_PROCESS_ID']\n"
            "if pid == '0': raise SystemExit(9)\ntime.sleep(1); os.abort()")
    status = launch.launch([sys.executable, "-c", code], num_processes=2, grace_s=30, out=out,
                           rerun="python -m fastvit_jax.launch --num_processes 2 -- train_tpu.py --workdir w")
    assert status == 134
    lines = [line for line in out.getvalue().splitlines() if line.startswith("[launch] error:")]
    assert lines == ["[launch] error: process 0 (JAX's coordinator) stopped first, with status 9; the other processes "
                     "cannot continue without it (JAX aborts them: status 134). Rerun the same command to resume from "
                     "the newest checkpoint: python -m fastvit_jax.launch --num_processes 2 -- train_tpu.py --workdir w"]
    assert launch.coordinator_lost_message(1, [134, 9], "x") is None
