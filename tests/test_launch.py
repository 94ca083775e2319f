"""``python -m fastvit_jax.launch``: environment per process, prefixed output, worst exit status,
the others killed after a failure (plain Python children, no JAX: seconds)."""

import io
import sys
import time

from fastvit_jax import launch


def test_each_process_gets_the_coordinator_its_id_and_its_devices():
    env = launch.process_env({"XLA_FLAGS": "--xla_cpu_x=1 --xla_force_host_platform_device_count=8", "A": "b"},
                             process_id=1, num_processes=3, address="127.0.0.1:999", devices_per_process=2)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:999"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["A"]) == ("3", "1", "b")
    assert env["XLA_FLAGS"] == "--xla_cpu_x=1 --xla_force_host_platform_device_count=2"
    assert env["JAX_PLATFORMS"] == "cpu"
    assert "JAX_PLATFORMS" not in launch.process_env({}, process_id=0, num_processes=2, address="h:1",
                                                     devices_per_process=None)


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
