"""The trainer CLI under file-system failures: one line on stderr, exit 2, nothing lost.

The CLI's error handling (``train_tpu.run``) runs in a subprocess on the tiny test model
(``tests/trainer_worker.py``). Full and read-only file systems are real: a small tmpfs mounted
in a user + mount namespace (``unshare -rm``), skipped with the reason where the kernel or the
CI user does not allow one.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from test_training_e2e import _config, _fake_imagenet  # noqa: E402  (tests/ is on sys.path)
from helpers import jit_init  # noqa: E402
from test_training_helpers import after_each_step  # noqa: E402
from tmpfs import cli_env, run_with_tmpfs, tmpfs_unavailable  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "trainer_worker.py")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _fake_imagenet(tmp_path_factory, "training_tfds", per_class=4)


def _worker_config(data_dir, workdir, tmp_path, name="config.json", **kw):
    """The tiny model's run (10 steps, checkpoints at 5 and 10) as the worker's JSON file."""
    cfg = _config(data_dir, workdir, export=False, plot=False, mixup=0.0, cutmix=0.0, **kw)
    overrides = {k: v for k, v in cfg.to_dict().items() if k != "variant"}
    path = tmp_path / name
    path.write_text(json.dumps(overrides))
    return path


def _assert_one_line_error(stderr: str, pattern: str) -> None:
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    assert re.search(pattern, errors[0]), errors[0]


@pytest.mark.parametrize("leave_free", [32768, 0])
def test_disk_full_during_a_checkpoint(data_dir, tmp_path, leave_free):
    """The disk fills after step 6. With 32 KiB left the logs still fit and step 10's checkpoint
    fails: exit 2, one line with the space needed, the partial save removed, step 5 intact. With
    nothing left the first writer to fail is TensorBoard's or metrics.jsonl's: exit 2, one line.
    Once space is freed the same command resumes from step 5."""
    reason = tmpfs_unavailable(tmp_path)
    if reason:
        pytest.skip(reason)
    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir(), logs.mkdir()
    cfg = _worker_config(data_dir, mnt / "wd", tmp_path)
    py = f"{sys.executable} {WORKER} {cfg}"
    r = run_with_tmpfs(f"""
        mount -t tmpfs -o size=32m tmpfs {mnt} || exit 90
        {py} --fill_disk_after 6 --leave_free {leave_free} > {logs}/1.out 2> {logs}/1.err; echo $? > {logs}/1.rc
        ls -a {mnt}/wd/checkpoints > {logs}/1.ls
        rm {mnt}/wd/filler
        {py} > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc
        ls -a {mnt}/wd/checkpoints > {logs}/2.ls
        cat {mnt}/wd/metrics.jsonl > {logs}/metrics.jsonl
    """)
    assert r.returncode == 0, r.stderr
    err1 = (logs / "1.err").read_text()
    assert (logs / "1.rc").read_text().strip() == "2", err1[-3000:]
    if leave_free:
        _assert_one_line_error(err1, r"checkpoint step 10 not saved: .*no space left on the device \(needs about "
                                     r"[0-9.]+ MiB, [0-9.]+ MiB free .*\); the partial save was removed and "
                                     r"checkpoint step 5 is intact; once that is fixed, rerun the same command")
    else:
        _assert_one_line_error(err1, r"no space left on the device")
    assert (logs / "1.ls").read_text().split() == [".", "..", "5"]  # no *.orbax-checkpoint-tmp left

    err2 = (logs / "2.err").read_text()
    assert (logs / "2.rc").read_text().strip() == "0", err2[-3000:]
    assert "resumed from" in err2 and "step 5" in err2
    assert "5" in (logs / "2.ls").read_text().split() and "10" in (logs / "2.ls").read_text().split()
    steps = [json.loads(line)["step"] for line in (logs / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 11))  # each step once, although 6-9 were logged before the failure


def test_read_only_workdir(data_dir, tmp_path):
    reason = tmpfs_unavailable(tmp_path)
    if reason:
        pytest.skip(reason)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cfg = _worker_config(data_dir, mnt / "wd", tmp_path)
    r = run_with_tmpfs(f"mount -t tmpfs -o ro,size=1m tmpfs {mnt} || exit 90\n"
                      f"exec {sys.executable} {WORKER} {cfg}")
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_line_error(r.stderr, re.escape(f"cannot write to the --workdir {str(mnt / 'wd')!r}: "
                                               "read-only file system"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write to a directory without write permission")
def test_workdir_without_write_permission(data_dir, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o555)
    cfg = _worker_config(data_dir, parent / "wd", tmp_path)
    r = _worker(cfg)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_line_error(r.stderr, re.escape(f"cannot write to the --workdir {str(parent / 'wd')!r}: "
                                               "permission denied"))


def test_export_never_overwrites_the_init_from_file(tmp_path):
    """--init_from naming the file the export would write: refused, the file byte-identical."""
    import jax

    import fastvit_jax
    from fastvit_jax.io import WriteError
    from fastvit_jax.training.config import get_config
    from fastvit_jax.training.pretrained import export_fused

    model = fastvit_jax.create_model("t8", num_classes=10)
    variables = jit_init(model)(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32))
    cfg = get_config("t8", dataset="demo", num_classes=10, image_size=64, workdir=str(tmp_path))
    target = export_fused(str(tmp_path), variables, cfg, step=1)
    before = open(target, "rb").read()
    with pytest.raises(WriteError, match=re.escape(f"output {target!r} is the input file")):
        export_fused(str(tmp_path), variables, cfg.replace(init_from=target), step=2)
    assert open(target, "rb").read() == before
    assert sorted(os.listdir(os.path.dirname(target))) == [os.path.basename(target)]  # no temp file


def _worker(cfg, *extra, timeout=600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, WORKER, str(cfg), *extra], capture_output=True, text=True, env=cli_env(),
                          timeout=timeout)


def test_a_corrupt_newest_checkpoint_does_not_block_resume_or_eval_only(data_dir, tmp_path):
    """Through the CLI: --eval_only and a restart skip a damaged newest step (moved aside, one
    warning line); when no step is readable, exit 2 names every step tried."""
    from test_training_units import _damage  # noqa: E402

    wd = tmp_path / "wd"
    train = _worker_config(data_dir, wd, tmp_path)
    evaluate = _worker_config(data_dir, wd, tmp_path, name="eval.json", eval_only=True)
    r = _worker(train)
    assert r.returncode == 0, r.stderr[-3000:]
    _damage(wd / "checkpoints" / "10", "truncated data")

    r = _worker(evaluate)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["num_examples"] == 8
    moved = [n for n in os.listdir(wd / "checkpoints") if n.startswith("10.corrupt-")]
    assert len(moved) == 1 and sorted(n for n in os.listdir(wd / "checkpoints") if n.isdigit()) == ["5"]
    warning = [line for line in r.stderr.splitlines() if "checkpoint step 10 is unreadable" in line]
    assert len(warning) == 1 and moved[0] in warning[0] and "Traceback" not in r.stderr

    r = _worker(train)  # the same command resumes from step 5
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "step 5" in r.stderr

    for step in ("5", "10"):
        _damage(wd / "checkpoints" / step, "truncated data")
    r = _worker(train)
    assert r.returncode == 2, r.stderr[-3000:]
    _assert_one_line_error(r.stderr, r"no readable checkpoint in .*; tried step 10: .*; step 5: .* \(the unreadable "
                                     r"ones were moved aside as <step>\.corrupt-<time>\)")
    assert not [n for n in os.listdir(wd / "checkpoints") if n.isdigit()]


def _run_cli(config, capsys):
    """train_tpu.run in this process on the tiny model: (exit status, stdout, the stderr 'error:' lines
    plus, after a failure, the whole stderr)."""
    import train_tpu
    from test_training_helpers import create_tiny_model  # noqa: E402

    capsys.readouterr()
    status = train_tpu.run(lambda: config, model_fn=create_tiny_model)
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    return status, out, errors if status == 0 else errors + [err]


def _listing(wd):
    return sorted(os.listdir(wd / "checkpoints")), (wd / "config.json").read_bytes() if (wd / "config.json").exists() \
        else None


def test_another_variant_never_condemns_a_healthy_workdir(data_dir, tmp_path, capsys):
    """The issue's case: --eval_only (or a resume) with a mistyped --variant on a healthy workdir
    is one line and exit 2, with or without config.json; no checkpoint is moved, and the right
    variant still resumes and evaluates."""
    from test_training_e2e import _config  # noqa: E402

    wd = tmp_path / "wd"
    train = _config(data_dir, wd, export=False, plot=False, mixup=0.0, cutmix=0.0)
    assert _run_cli(train, capsys)[0] == 0
    before = _listing(wd)
    wrong = train.replace(variant="t12")

    status, _, errors = _run_cli(wrong.replace(eval_only=True), capsys)
    assert status == 2 and len(errors) == 2, errors
    assert "was trained with --variant t8" in errors[0] and "this run has --variant t12" in errors[0]
    status, _, errors = _run_cli(wrong, capsys)  # a resume: the config check names the field
    assert status == 2 and "variant: workdir has 't8', this run has 't12'" in errors[-1]
    assert _listing(wd) == before

    saved_config = (wd / "config.json").read_bytes()
    (wd / "config.json").unlink()  # checkpoints alone: their shapes tell
    for config in (wrong.replace(eval_only=True), wrong.replace(num_steps=20)):
        status, _, errors = _run_cli(config, capsys)
        assert status == 2 and len(errors) == 2, errors
        assert re.search(r"checkpoint step 10 in .* holds another model: params/.* is \(.*\) in the checkpoint, "
                         r"\(.*\) in this model.*Nothing was moved", errors[0]), errors[0]
    assert sorted(os.listdir(wd / "checkpoints")) == before[0]
    (wd / "config.json").write_bytes(saved_config)

    status, out, _ = _run_cli(train.replace(eval_only=True), capsys)
    assert status == 0 and json.loads(out)["num_examples"] == 8
    assert _listing(wd) == before


def test_no_silent_fresh_start_in_a_workdir_of_an_earlier_run(data_dir, tmp_path, capsys):
    """Every checkpoint unreadable: exit 2 (they are moved aside); the next start refuses step 0
    (config.json and the moved-aside steps name an earlier run) until --restart_from_scratch,
    which trains from step 0 with each step logged once."""
    from test_training_e2e import _config  # noqa: E402
    from test_training_units import _damage  # noqa: E402

    wd = tmp_path / "wd"
    train = _config(data_dir, wd, export=False, plot=False, mixup=0.0, cutmix=0.0)
    assert _run_cli(train, capsys)[0] == 0
    for step in ("5", "10"):
        _damage(wd / "checkpoints" / step, "truncated data")
    status, _, errors = _run_cli(train, capsys)
    assert status == 2 and "no readable checkpoint" in errors[0]

    status, _, errors = _run_cli(train, capsys)
    assert status == 2 and len(errors) == 2, errors
    assert re.search(r"holds an earlier run \(config\.json and checkpoints moved aside as unreadable "
                     r"\(10\.corrupt-.*, 5\.corrupt-.*\)\) but no readable checkpoint.*--restart_from_scratch",
                     errors[0]), errors[0]
    assert not [n for n in os.listdir(wd / "checkpoints") if n.isdigit()]

    status, _, errors = _run_cli(train.replace(restart_from_scratch=True), capsys)
    assert status == 0, errors
    steps = [json.loads(line)["step"] for line in (wd / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 11))


def test_one_trainer_per_workdir(data_dir, tmp_path, capsys):
    """A second trainer on a workdir held by a live one exits 2 naming the holder's pid and host,
    touching nothing; kill -9 of the holder releases the lock and the same command runs."""
    import signal
    import socket

    from test_training_e2e import _config  # noqa: E402

    wd = tmp_path / "wd"
    wd.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fastvit_jax.training.workdir_lock import WorkdirLock\n"
                               "with WorkdirLock(sys.argv[1]):\n    print('held', flush=True); time.sleep(600)",
         str(wd)], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        train = _config(data_dir, wd, export=False, plot=False, mixup=0.0, cutmix=0.0, num_steps=5)
        status, _, errors = _run_cli(train, capsys)
        assert status == 2 and len(errors) == 2, errors
        assert re.search(rf"--workdir .* is in use by another trainer \(pid {holder.pid} on "
                         rf"{re.escape(socket.gethostname())}, started .*\); wait for it to end", errors[0]), errors[0]
        assert sorted(os.listdir(wd)) == ["trainer.lock"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    status, _, errors = _run_cli(train, capsys)
    assert status == 0, errors
    from fastvit_jax.training.workdir_lock import WorkdirLock, WorkdirLockedError

    with WorkdirLock(str(wd)):  # released at the end of the run; held again, a second holder is refused
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()} on"):
            WorkdirLock(str(wd)).__enter__()


def _checkpoint_steps(wd):
    return sorted(int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit())


def test_ctrl_c_saves_and_stops_a_second_one_aborts(data_dir, tmp_path, capsys, monkeypatch):
    """One Ctrl-C (SIGINT) is a preemption: checkpoint at that step, exit 0, handlers restored,
    the same command resumes. A second Ctrl-C later aborts: one line, exit 130."""
    import signal

    from fastvit_jax.training import preemption
    from test_training_e2e import _config  # noqa: E402

    wd = tmp_path / "wd"
    train = _config(data_dir, wd, export=False, plot=False, mixup=0.0, cutmix=0.0, checkpoint_every=100)
    handlers = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}

    def ctrl_c_at(step, times):
        def callback(s):
            if s == step:
                for _ in range(times):
                    os.kill(os.getpid(), signal.SIGINT)
        return after_each_step(callback)

    with ctrl_c_at(3, 1):
        status, out, _ = _run_cli(train, capsys)
    assert status == 0 and "stopped at step 3" in out
    assert _checkpoint_steps(wd) == [3]
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == handlers

    monkeypatch.setattr(preemption, "FORCE_AFTER_S", 0.0)
    with ctrl_c_at(5, 2):
        status, _, errors = _run_cli(train, capsys)
    assert status == 130 and len(errors) == 2, errors
    assert errors[0].startswith("error: interrupted: nothing was saved after") and "rerun the same command" in errors[0]
    assert _checkpoint_steps(wd) == [3]
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == handlers


def test_sigterm_during_compilation_and_final_evaluation(data_dir, tmp_path, capsys, monkeypatch):
    """SIGTERM while the step compiles: exit 0 before the first step, nothing lost; while the
    final evaluation runs: exit 0 with the final checkpoint saved and no export; the same command
    then evaluates and exports without training."""
    import signal

    from fastvit_jax.training import trainer
    from test_training_e2e import _config  # noqa: E402

    wd = tmp_path / "wd"
    train = _config(data_dir, wd, export=True, plot=False, mixup=0.0, cutmix=0.0)
    real_compile, real_evaluate = trainer._compile_train_step, trainer._evaluate

    def compile_then_term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_compile(*args, **kwargs)

    monkeypatch.setattr(trainer, "_compile_train_step", compile_then_term)
    status, out, _ = _run_cli(train, capsys)
    assert status == 0 and "stopped at step 0" in out and not os.listdir(wd / "checkpoints")
    monkeypatch.setattr(trainer, "_compile_train_step", real_compile)

    def evaluate_then_term(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "_evaluate", evaluate_then_term)
    status, out, _ = _run_cli(train, capsys)
    assert status == 0 and "stopped at step 10" in out
    assert _checkpoint_steps(wd) == [5, 10] and not (wd / "export").exists()
    monkeypatch.setattr(trainer, "_evaluate", real_evaluate)
    status, out, _ = _run_cli(train, capsys)
    assert status == 0 and "done: step 10" in out and os.listdir(wd / "export")
    from fastvit_jax.data.pipeline import dataset_info
    from fastvit_jax.io import load_metadata
    from fastvit_variants import PretrainedCfg

    exported = os.path.join(wd / "export", os.listdir(wd / "export")[0])  # the class names travel with the weights
    data_config = PretrainedCfg.from_dict(json.loads(load_metadata(exported)["pretrained_cfg"]))
    assert data_config.label_names == dataset_info("imagenet2012", data_dir).class_names
    assert len(data_config.label_names) == data_config.num_classes == 1000  # imagenet2012: 4 classes used


@pytest.mark.parametrize("damage", ["truncated", "flipped bytes", "deleted shard", "data_dir is a file"])
def test_damaged_dataset_is_one_line_and_leaves_no_empty_workdir(data_dir, tmp_path, capsys, damage):
    """A truncated or corrupted train shard, a deleted one, a --data_dir that is a file: exit 2, one
    line naming the dataset folder and how to rebuild it; the new workdir is not left behind."""
    import shutil

    from test_training_e2e import _config  # noqa: E402

    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    shard = next((copy / "imagenet2012").glob("*/imagenet2012-train.tfrecord-*"))
    if damage == "truncated":
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size // 2)
    elif damage == "flipped bytes":
        data = bytearray(shard.read_bytes())
        for i in range(len(data) // 3, len(data) // 3 + 64):
            data[i] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "deleted shard":
        shard.unlink()
    else:
        copy = tmp_path / "a_file"
        copy.write_text("not a folder")
    wd = tmp_path / "wd"
    status, _, errors = _run_cli(_config(str(copy), wd, export=False, plot=False), capsys)
    assert status == 2 and len(errors) == 2, errors
    if damage == "data_dir is a file":
        assert f"--data_dir {str(copy)!r} is a file, not a directory" in errors[0]
    else:
        meaning = {"truncated": "a damaged record", "flipped bytes": "a damaged record",
                   "deleted shard": "a missing file"}[damage]
        assert re.search(rf"cannot read dataset 'imagenet2012' in {re.escape(str(copy / 'imagenet2012'))}: "
                         rf"{meaning} \(.*\); its prepared files are damaged or incomplete: delete its version folder "
                         rf"and prepare it again \(tfds build imagenet2012", errors[0]), errors[0]
    assert not wd.exists()


def test_eval_only_on_a_read_only_workdir(data_dir, tmp_path):
    """--eval_only of a workdir on a read-only file system: exit 0, the results on stdout, one
    warning that they were not written."""
    reason = tmpfs_unavailable(tmp_path)
    if reason:
        pytest.skip(reason)
    mnt, logs = tmp_path / "mnt", tmp_path / "logs"
    mnt.mkdir(), logs.mkdir()
    train = _worker_config(data_dir, mnt / "wd", tmp_path)
    evaluate = _worker_config(data_dir, mnt / "wd", tmp_path, name="eval.json", eval_only=True)
    r = run_with_tmpfs(f"""
        mount -t tmpfs -o size=32m tmpfs {mnt} || exit 90
        {sys.executable} {WORKER} {train} > {logs}/1.out 2> {logs}/1.err || exit 91
        mount -o remount,ro {mnt} || exit 92
        {sys.executable} {WORKER} {evaluate} > {logs}/2.out 2> {logs}/2.err; echo $? > {logs}/2.rc
    """)
    assert r.returncode == 0, (r.stderr, (logs / "1.err").read_text()[-3000:] if (logs / "1.err").exists() else "")
    err = (logs / "2.err").read_text()
    assert (logs / "2.rc").read_text().strip() == "0", err[-3000:]
    assert json.loads((logs / "2.out").read_text())["num_examples"] == 8
    assert "Traceback" not in err
    warnings = [line for line in err.splitlines() if "eval-only results not written" in line]
    assert len(warnings) == 1 and "read-only file system" in warnings[0], err[-3000:]
