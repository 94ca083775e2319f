"""Several JAX processes on one machine: ``python -m fastvit_jax.launch`` running
tests/multiprocess_worker.py (the tiny stand-in model through ``train_and_evaluate`` on the
embedded demo dataset, 6 steps of batch 16 at 32 px, a checkpoint every 3 steps).

One shared sequence of runs (built once per session, see ``_shared_dir``):
  1. 2 processes x 2 CPU devices on a fresh data_dir, paused after step 4; both are killed
     with SIGKILL once the step-3 checkpoint is on disk;
  2. the same command again: resumes from step 3 and finishes at step 6;
  3. 1 process x 4 devices fed the same global batches (process slices 0 and 1 concatenated);
  4. 1 process x 2 devices on a copy of the finished 2-process workdir (restores its step-6
     checkpoint and evaluates it).
A separate run kills one of two processes and times how long the other takes to give up.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from test_training_e2e import _shared_dir  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.xdist_group("multihost")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "multiprocess_worker.py")
STEPS, CHECKPOINT_EVERY, PAUSE_AFTER = 6, 3, 4
LOST_PEER_TIMEOUT_S = 10
RUN_TIMEOUT_S = 300


def _start(log_path, *, processes, devices, worker_args, grace_s=60):
    cmd = [sys.executable, "-m", "fastvit_jax.launch", "--num_processes", str(processes), "--devices_per_process",
           str(devices), "--grace_s", str(grace_s), "--", WORKER, *worker_args]
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True), log


def _run(log_path, **kwargs):
    """(exit status, log text, seconds) of a launcher run to its end."""
    start = time.monotonic()
    proc, log = _start(log_path, **kwargs)
    try:
        rc = proc.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    return rc, open(log_path).read(), time.monotonic() - start


def _wait_for(log_path, pattern, count, proc, timeout=RUN_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = open(log_path).read()
        if len(re.findall(pattern, text)) >= count:
            return text
        assert proc.poll() is None, f"launcher ended before {pattern!r}:\n{text[-3000:]}"
        time.sleep(0.5)
    raise AssertionError(f"no {count} x {pattern!r} within {timeout}s:\n{open(log_path).read()[-3000:]}")


def _wait_for_path(path, timeout=RUN_TIMEOUT_S):
    """True once ``path`` exists (orbax finalises a checkpoint in a background thread, which goes on
    while the step callback pauses the run), False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not os.path.isdir(path):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def _child_pids(text):
    return {int(p): int(pid) for p, pid in re.findall(r"\[launch\] process (\d+) of \d+: pid (\d+)", text)}


def _worker_args(data_dir, workdir, *extra):
    return ["--data_dir", str(data_dir), "--workdir", str(workdir), "--num_steps", str(STEPS),
            "--checkpoint_every", str(CHECKPOINT_EVERY), *extra]


def _result(workdir, process):
    with open(os.path.join(workdir, f"losses_p{process}.json")) as f:
        return json.load(f)


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Runs 1-4 of the module docstring; {name: {'rc', 'log', 'seconds'}} plus the paths."""
    with _shared_dir(tmp_path_factory, "multihost_runs") as d:
        summary_path = d / "summary.json"
        if not summary_path.exists():
            data, two, one, restored = d / "data", d / "two_processes", d / "one_process", d / "restored_on_one"
            summary = {"data": str(data), "two": str(two), "one": str(one), "restored": str(restored)}

            # 1. Two processes, fresh data_dir, killed (SIGKILL, both) after the step-3 checkpoint.
            start = time.monotonic()
            proc, log = _start(d / "killed.log", processes=2, devices=2,
                               worker_args=_worker_args(data, two, "--pause_after_step", str(PAUSE_AFTER)))
            try:
                text = _wait_for(d / "killed.log", rf"\[p\d\] paused after step {PAUSE_AFTER}", 2, proc)
                checkpoint_on_disk = _wait_for_path(two / "checkpoints" / str(CHECKPOINT_EVERY))
                for pid in _child_pids(text).values():
                    os.kill(pid, signal.SIGKILL)
                rc = proc.wait(timeout=60)
            finally:
                if proc.poll() is None:
                    proc.kill()
                log.close()
            summary["killed"] = {"rc": rc, "log": open(d / "killed.log").read(), "seconds": time.monotonic() - start,
                                 "checkpoint_on_disk": checkpoint_on_disk}

            # 2. The same command again (without the pause): resumes and finishes.
            rc, text, seconds = _run(d / "restarted.log", processes=2, devices=2, worker_args=_worker_args(data, two))
            summary["restarted"] = {"rc": rc, "log": text, "seconds": seconds}

            # 3. One process with 4 devices, fed the global batches of the 2-process run.
            rc, text, seconds = _run(d / "one.log", processes=1, devices=4,
                                     worker_args=_worker_args(data, one, "--feed_global_batches"))
            summary["one_run"] = {"rc": rc, "log": text, "seconds": seconds}

            # 4. The finished 2-process workdir on 1 process x 2 devices: restore step 6 and evaluate.
            shutil.copytree(two, restored)
            rc, text, seconds = _run(d / "restored.log", processes=1, devices=2,
                                     worker_args=_worker_args(data, restored))
            summary["restored_run"] = {"rc": rc, "log": text, "seconds": seconds}
            summary_path.write_text(json.dumps(summary))
        return json.loads(summary_path.read_text())


def test_two_processes_on_a_fresh_data_dir_prepare_the_dataset_once(runs):
    text = runs["killed"]["log"]
    assert len(re.findall(r"^\[p0\] .*preparing the demo dataset in ", text, re.M)) == 1, text[-3000:]
    assert not re.search(r"^\[p1\] .*preparing the demo dataset", text, re.M)
    assert re.search(r"^\[p1\] .*process 1: waiting for process 0 to prepare dataset 'demo'", text, re.M)
    assert "Traceback" not in text and "FileExistsError" not in text
    assert sorted(os.listdir(os.path.join(runs["data"], "fastvit_demo", "default"))) == [".prepare.lock", "1.0.0"]
    from fastvit_jax.data.demo import demo_builder

    assert demo_builder(runs["data"]).is_prepared()  # prepared once, completely (tfds's own print is silenced)


def test_two_processes_agree_and_equal_one_process_fed_the_same_global_batches(runs):
    """Both processes exit 0 with the same losses, equal (1e-6 rel) to 1 process x 4 devices."""
    assert runs["restarted"]["rc"] == 0, runs["restarted"]["log"][-3000:]
    assert runs["one_run"]["rc"] == 0, runs["one_run"]["log"][-3000:]
    assert runs["restarted"]["log"].count("[launch] exit statuses [0, 0]") == 1
    p0, p1 = _result(runs["two"], 0), _result(runs["two"], 1)
    assert p0["losses"] == p1["losses"] and p0["eval"] == p1["eval"]
    assert (p0["process_count"], p0["device_count"]) == (2, 4)
    one = _result(runs["one"], 0)
    assert (one["process_count"], one["device_count"]) == (1, 4)
    # Steps 1-3 trained before the kill, 4-6 after the restart: process 0 logged every one once.
    two_losses = {r["step"]: r["loss"] for r in _metrics(runs["two"]) if r["kind"] == "train"}
    assert sorted(two_losses) == list(range(1, STEPS + 1))
    for step in range(1, STEPS + 1):
        assert two_losses[step] == pytest.approx(one["losses"][str(step)], rel=1e-6), step


def test_kill_of_both_processes_after_a_checkpoint_then_restart_reproduces_the_losses(runs):
    killed = runs["killed"]
    assert killed["checkpoint_on_disk"] and killed["rc"] == 128 + signal.SIGKILL, killed["log"][-3000:]
    assert "[launch] exit statuses [137, 137]" in killed["log"]
    assert re.search(r"^\[p0\] .*resumed from \S+ step 3", runs["restarted"]["log"], re.M)
    p0, one = _result(runs["two"], 0), _result(runs["one"], 0)
    assert p0["resumed_from"] == CHECKPOINT_EVERY and sorted(map(int, p0["losses"])) == [4, 5, 6]
    for step, loss in p0["losses"].items():
        assert loss == pytest.approx(one["losses"][step], rel=1e-6), step


def test_outputs_are_written_once_by_process_0(runs):
    workdir, text = runs["two"], runs["killed"]["log"] + runs["restarted"]["log"]
    records = _metrics(workdir)
    keys = [(r["step"], r["kind"]) for r in records]
    assert len(keys) == len(set(keys)), keys  # two writers would log every record twice
    assert [r["step"] for r in records if r["kind"] == "eval"] == [STEPS]
    process_0_pids = {_child_pids(runs[name]["log"])[0] for name in ("killed", "restarted")}
    process_1_pids = {_child_pids(runs[name]["log"])[1] for name in ("killed", "restarted")}
    events = os.listdir(os.path.join(workdir, "tensorboard"))
    writers = {int(re.search(r"\.(\d+)\.\d+\.v2$", name).group(1)) for name in events}  # ...<host>.<pid>.<n>.v2
    assert writers and writers <= process_0_pids and not writers & process_1_pids, (events, text[-2000:])
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 0
    assert os.listdir(os.path.join(workdir, "export")) == ["fastvit_t8_ema_fused.safetensors"]
    assert not os.path.exists(os.path.join(workdir, "checkpoints", "tmp"))


def test_checkpoint_of_two_processes_restores_on_one_process_with_another_mesh(runs):
    """The step-6 checkpoint of 2 processes x 2 devices, restored on 1 process x 2 devices,
    evaluates to the metrics the 2 processes logged at step 6."""
    run = runs["restored_run"]
    assert run["rc"] == 0, run["log"][-3000:]
    restored = _result(runs["restored"], 0)
    assert (restored["process_count"], restored["device_count"]) == (1, 2)
    assert restored["resumed_from"] == STEPS and restored["losses"] == {}
    warning = (r"WARNING resuming step 6 of a run trained by 2 process\(es\) x 4 devices on 1 process\(es\) x 2 "
               r"devices: .* the data order from here on is that of 1 process\(es\)")
    assert re.search(warning, run["log"]), run["log"][-3000:]
    assert "WARNING resuming step" not in runs["restarted"]["log"]  # same process count: same order
    with open(os.path.join(runs["two"], "topology.json")) as f:
        assert json.load(f) == {"process_count": 2, "device_count": 4}
    logged = [r for r in _metrics(runs["two"]) if r["kind"] == "eval"][-1]
    for key in ("top1", "top5", "ema_top1", "ema_top5", "num_examples"):
        assert restored["eval"][key] == logged[key], key
    for key in ("loss", "ema_loss"):
        assert restored["eval"][key] == pytest.approx(logged[key], rel=1e-5), key


def test_kill_of_one_process_ends_the_other_within_the_timeout_naming_it(tmp_path):
    log_path = tmp_path / "lost.log"
    proc, log = _start(log_path, processes=2, devices=2, worker_args=_worker_args(
        tmp_path / "data", tmp_path / "work", "--pause_after_step", str(PAUSE_AFTER),
        "--distributed_timeout", str(LOST_PEER_TIMEOUT_S)))
    try:
        text = _wait_for(log_path, rf"\[p\d\] paused after step {PAUSE_AFTER}", 2, proc)
        killed_at = time.monotonic()
        os.kill(_child_pids(text)[1], signal.SIGKILL)
        proc.wait(timeout=RUN_TIMEOUT_S)
        seconds = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = log_path.read_text()
    assert "[launch] exit statuses [4, 137]" in text, text[-3000:]
    assert re.search(r"^\[p0\] error: process 1 stopped responding \(no heartbeat for 1\ds, --distributed_timeout "
                     rf"{LOST_PEER_TIMEOUT_S}\); this is process 0 of 2\. Rerun the same command on every host to "
                     r"resume from step 3 \(", text, re.M), text[-3000:]
    # The peer's last heartbeat may precede the kill by up to a beat, and be seen a beat late.
    assert LOST_PEER_TIMEOUT_S - 2 <= seconds < LOST_PEER_TIMEOUT_S + 20, (seconds, text[-3000:])


def test_demo_preparation_removes_a_crashed_runs_temporary_folder_and_names_a_broken_one(tmp_path):
    from fastvit_jax.data.demo import DatasetPreparationError, demo_builder, prepare_demo

    parent = os.path.dirname(demo_builder(str(tmp_path), 20, 10).data_dir)
    os.makedirs(os.path.join(parent, "incomplete.ABC123_1.0.0"))
    prepare_demo(str(tmp_path), 20, 10)  # a crashed run's temporary folder is no obstacle
    assert demo_builder(str(tmp_path), 20, 10).is_prepared()
    assert sorted(os.listdir(parent)) == [".prepare.lock", "1.0.0"]

    broken = os.path.join(os.path.dirname(demo_builder(str(tmp_path / "b"), 20, 10).data_dir), "1.0.0")
    os.makedirs(broken)
    with pytest.raises(DatasetPreparationError, match=f"{re.escape(broken)} exists but is not a prepared dataset"):
        prepare_demo(str(tmp_path / "b"), 20, 10)
