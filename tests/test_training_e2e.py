"""End-to-end trainer tests on 8 fake CPU devices, data through the real tfds path.

A tiny ImageNet (16 random JPEGs of 4 classes, 8 val images) is written as the official
tars and prepared by the real ``imagenet2012`` tfds builder (once per module). FastViT-t8
trains on it at 32 px with batch 16 (the whole train set each step, so it is learnable in
a few steps). One uninterrupted 10-step run is shared by several tests; an interrupted and
resumed run must reproduce its losses. NaN / SIGTERM / config tests use a tiny stand-in
model so they compile in seconds.
"""

import contextlib
import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys

import jax
import numpy as np
import pytest

import fastvit_jax
from fastvit_jax.training import trainer
from fastvit_jax.training.config import ConfigMismatchError, get_config
from fastvit_jax.training.evaluate import evaluate_checkpoint
from fastvit_jax.training.metrics import read_metrics

from test_training_helpers import TinyNet, after_each_step, create_tiny_model  # noqa: E402  (tests/ is on sys.path)

pytestmark = pytest.mark.xdist_group("training_e2e")  # one worker if honoured; see _shared_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 10


@contextlib.contextmanager
def _shared_dir(tmp_path_factory, name):
    """A directory shared by the xdist workers of this session, with an exclusive lock.

    (xdist_group marks are not honoured by the installed pytest/xdist versions, so the
    e2e tests may land on both workers: the expensive artefacts are built once.)"""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield d
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fake_imagenet(tmp_path_factory, name: str, per_class: int) -> str:
    """A prepared tiny imagenet2012 (4 classes x per_class train JPEGs, 8 val), built once per session."""
    from fake_imagenet import make_fake_imagenet

    with _shared_dir(tmp_path_factory, name) as d:
        if not (d / "done").exists():
            make_fake_imagenet(str(d), str(d / "manual"), num_classes_used=4, per_class=per_class, num_val=8)
            (d / "done").write_text("ok")
    return str(d)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return _fake_imagenet(tmp_path_factory, "training_tfds", per_class=4)


def _config(data_dir, workdir, **kw):
    base = dict(
        dataset="imagenet2012", data_dir=data_dir, workdir=str(workdir), global_batch_size=16, image_size=32,
        num_epochs=None, num_steps=STEPS, warmup_steps=2, lr=2e-3,
        mixup=0.2, cutmix=1.0, randaugment="", reprob=0.0, color_jitter=0.0, rrc_scale=(0.5, 1.0),
        checkpoint_every=5, log_every=1, eval_every=0, eval_batch_size=8, ema_decay=0.9, progress=False,
    )
    base.update(kw)
    return get_config("t8", **base)


class _Crash(Exception):
    pass


def _summary(res):
    keep = {k: getattr(res, k) for k in ("final_step", "preempted", "eval", "export_path", "plot_path",
                                         "resumed_from")}
    keep["losses"] = {str(k): v for k, v in res.losses.items()}
    return keep


# The real t8 with the CPU default ('shift') lowering, as `make demo` trains it: at 2 images per
# device its train step takes ~0.2 s against ~2.8 s with native convs (XLA:CPU's grouped-conv
# backward), which more than pays for its longer compile (~25 s against ~10 s).
T8 = fastvit_jax.create_model


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """Built once per session (shared across xdist workers), in one process so that the
    three runs share their compilations:
      full:    an uninterrupted 10-step t8 run (checkpoints at 5 and 10);
      resumed: the same config in another workdir (no export or plot), crashed at step 7 (last
               checkpoint 5), then restarted; the restart's summary.
    """
    with _shared_dir(tmp_path_factory, "training_runs") as d:
        path = d / "summary.json"
        if not path.exists():
            full = trainer.train_and_evaluate(_config(data_dir, d / "full"), model_fn=T8)

            def crash_at_7(step):
                if step == 7:
                    raise _Crash()

            cfg = _config(data_dir, d / "resume", export=False, plot=False)  # the full run checks those
            try:
                with after_each_step(crash_at_7):
                    trainer.train_and_evaluate(cfg, model_fn=T8)
                raise AssertionError("the crash callback did not fire")
            except _Crash:
                pass
            ckpts = sorted(int(n) for n in os.listdir(d / "resume" / "checkpoints") if n.isdigit())
            resumed = trainer.train_and_evaluate(cfg, model_fn=T8)
            logged = [r["step"] for r in read_metrics(str(d / "resume")) if r["kind"] == "train"]
            path.write_text(json.dumps({"full": _summary(full), "resumed": _summary(resumed),
                                        "ckpts_after_crash": ckpts, "resume_logged_steps": logged}))
        out = json.loads(path.read_text())
    for k in ("full", "resumed"):
        out[k]["losses"] = {int(s): v for s, v in out[k]["losses"].items()}
    out["full_dir"] = d / "full"
    return out


@pytest.fixture(scope="module")
def full_run(runs):
    return runs["full_dir"], runs["full"]


def test_loss_finite_and_decreasing(full_run):
    _, res = full_run
    losses = [res["losses"][s] for s in range(1, STEPS + 1)]
    assert all(np.isfinite(losses)), losses
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.5, losses


def test_outputs_written(full_run):
    wd, res = full_run
    assert res["final_step"] == STEPS and not res["preempted"]
    steps = sorted(int(n) for n in os.listdir(os.path.join(wd, "checkpoints")) if n.isdigit())
    assert steps == [5, 10]  # every 5 steps and at the end
    cfg = json.load(open(os.path.join(wd, "config.json")))
    assert cfg["variant"] == "t8" and cfg["num_classes"] == 1000
    recs = read_metrics(str(wd))
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, STEPS + 1))
    ev = [r for r in recs if r["kind"] == "eval"][-1]
    for k in ("loss", "top1", "top5", "ema_loss", "ema_top1", "ema_top5"):
        assert np.isfinite(ev[k]) and (k.endswith("loss") or 0 <= ev[k] <= 1)
    assert ev["num_examples"] == 8
    assert os.path.getsize(res["plot_path"]) > 1000
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(os.path.join(wd, "tensorboard")))


def test_fused_export_matches_train_form(full_run, data_dir, tmp_path):
    """The exported fused EMA weights load into inference_mode=True and agree with EMA eval."""
    import fastvit_jax

    wd, res = full_run
    fused = fastvit_jax.load_variables(res["export_path"])
    m = evaluate_checkpoint(_config(data_dir, tmp_path / "eval_export", init_from=res["export_path"],
                                    eval_only=True))
    assert m["top5"] == pytest.approx(res["eval"]["ema_top5"], abs=1e-6)
    assert m["loss"] == pytest.approx(res["eval"]["ema_loss"], rel=1e-4, abs=1e-4)
    assert fastvit_jax.reparameterize(fused)["params"].keys() == fused["params"].keys()  # already fused


def test_trainer_export_loads_with_its_data_config(full_run, data_dir):
    """load_model on the trainer's export: fused t8 with the run's data config, and the EMA eval's accuracy."""
    import fastvit_jax
    from fastvit_jax.data.pipeline import make_eval_dataset

    _, res = full_run
    model, variables = fastvit_jax.load_model(res["export_path"])
    forward = jax.jit(model.apply)
    cfg = model.pretrained_cfg
    assert (model.cfg.name, model.inference_mode, model.num_classes) == ("t8", True, 1000)
    assert (cfg.image_size, cfg.crop_pct) == (32, 0.9)
    correct5 = total = 0
    for batch in make_eval_dataset("imagenet2012", data_dir, batch_size=8, image_size=cfg.image_size,
                                   crop_pct=cfg.crop_pct).as_numpy_iterator():
        logits = np.asarray(forward(variables, batch["image"]))
        top5 = np.argsort(-logits, axis=-1)[:, :5]
        keep = batch["mask"] > 0
        correct5 += int((top5 == batch["label"][:, None]).any(-1)[keep].sum())
        total += int(keep.sum())
    assert correct5 / total == pytest.approx(res["eval"]["ema_top5"], abs=1e-6)


def test_kill_and_resume_reproduces_losses(runs):
    ref, res = runs["full"], runs["resumed"]
    assert runs["ckpts_after_crash"] == [5]  # crashed at 7: the step-5 checkpoint survives
    assert res["resumed_from"] == 5 and res["final_step"] == STEPS
    assert sorted(res["losses"]) == list(range(6, STEPS + 1))
    for s in range(6, STEPS + 1):
        assert res["losses"][s] == pytest.approx(ref["losses"][s], rel=1e-5, abs=1e-5), s
    assert res["eval"]["ema_loss"] == pytest.approx(ref["eval"]["ema_loss"], rel=1e-5)
    # steps 6 and 7 were logged before the crash and again after the resume from 5: each appears once
    assert runs["resume_logged_steps"] == list(range(1, STEPS + 1))


# ---------------------------------------------------------------------------- tiny-model tests
# The model is passed in: model_fn=create_tiny_model builds a stand-in that compiles in seconds.


def test_sigterm_saves_and_stops(data_dir, tmp_path):
    cfg = _config(data_dir, tmp_path / "wd", checkpoint_every=100)
    handler = signal.getsignal(signal.SIGTERM)

    def term_at_3(step):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's handler sets a flag

    with after_each_step(term_at_3):
        res = trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    assert res.preempted and res.final_step == 3 and res.eval is None
    assert sorted(int(n) for n in os.listdir(tmp_path / "wd" / "checkpoints") if n.isdigit()) == [3]
    assert signal.getsignal(signal.SIGTERM) == handler  # the trainer's handler is gone
    res2 = trainer.train_and_evaluate(cfg.replace(export=False), model_fn=create_tiny_model)
    assert res2.resumed_from == 3 and res2.final_step == STEPS


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    def nan_model(variant, *, num_classes, drop_path_rate, dtype, **kw):
        return TinyNet(num_classes=num_classes, nan_after=3)

    cfg = _config(data_dir, tmp_path / "wd", checkpoint_every=2, log_every=5)
    with pytest.raises(trainer.NonFiniteLossError) as e:
        trainer.train_and_evaluate(cfg, model_fn=nan_model)
    assert e.value.step == 3 and e.value.last_checkpoint == 2
    assert "step 3" in str(e.value)
    assert sorted(int(n) for n in os.listdir(tmp_path / "wd" / "checkpoints") if n.isdigit()) == [2]


def test_bad_flags_are_refused_before_the_workdir_is_touched(data_dir, tmp_path):
    for bad, message in ((dict(num_steps=-5), "--num_steps must be positive, got -5"),
                         (dict(image_size=50), "--image_size must be a multiple of 16 and at least 32, got 50"),
                         (dict(init_from=str(tmp_path / "missing.safetensors")), "does not exist")):
        with pytest.raises(ValueError, match=re.escape(message)):
            trainer.train_and_evaluate(_config(data_dir, tmp_path / "wd", **bad), model_fn=create_tiny_model)
        assert not (tmp_path / "wd").exists()


def test_a_failed_first_attempt_does_not_lock_the_workdir(data_dir, tmp_path):
    def crash_at_1(step):
        raise _Crash()

    cfg = _config(data_dir, tmp_path / "wd", num_steps=2, checkpoint_every=100, export=False, plot=False)
    with pytest.raises(_Crash), after_each_step(crash_at_1):
        trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    assert not (tmp_path / "wd" / "config.json").exists()
    res = trainer.train_and_evaluate(cfg.replace(lr=1e-3, seed=3), model_fn=create_tiny_model)  # not refused
    assert res.final_step == 2 and json.load(open(tmp_path / "wd" / "config.json"))["seed"] == 3


def test_changed_model_or_data_field_is_refused(data_dir, tmp_path):
    cfg = _config(data_dir, tmp_path / "wd", num_steps=2, export=False)
    trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    with pytest.raises(ConfigMismatchError, match="image_size: workdir has 32, this run has 48"):
        trainer.train_and_evaluate(cfg.replace(image_size=48), model_fn=create_tiny_model)
    with pytest.raises(ConfigMismatchError, match="variant"):
        trainer.train_and_evaluate(cfg.replace(variant="sa12"), model_fn=create_tiny_model)
    with pytest.raises(ConfigMismatchError) as e:  # a model field and a data field, both named
        trainer.train_and_evaluate(cfg.replace(drop_path=0.3, hflip=0.0), model_fn=create_tiny_model)
    assert "drop_path: workdir has 0.0, this run has 0.3" in str(e.value) and "hflip" in str(e.value)


@pytest.fixture(scope="module")
def data_dir_32(tmp_path_factory):
    """32 train images (4 classes x 8): one batch of 32 per epoch."""
    return _fake_imagenet(tmp_path_factory, "training_tfds_32", per_class=8)


def test_short_run_reaches_its_peak_lr_and_the_loss_falls(data_dir_32, tmp_path, caplog):
    """The issue's trap: 30 steps at batch 32 under the recipe's 5-epoch warm-up never left it.
    Now the warm-up is scaled to 10% of the run (3 steps) and a warning says so."""
    cfg = get_config("t8", dataset="imagenet2012", data_dir=data_dir_32, workdir=str(tmp_path / "wd"),
                     global_batch_size=32, image_size=32, num_epochs=None, num_steps=30, lr=3e-3,
                     randaugment="", reprob=0.0, log_every=1, eval_batch_size=8, progress=False, export=False)
    # eval_every not set: every epoch (one step of 32 images here), so the evals form a curve
    with caplog.at_level(logging.INFO, logger="fastvit_jax.training"):
        res = trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    assert res.plan.warmup_steps == 3 and res.plan.steps_per_epoch == 1
    assert "warm-up scaled from the recipe's 5 epochs (5 steps) to 3 steps" in caplog.text
    assert "peak lr 0.003, warm-up 3 steps" in caplog.text and "training to step 30" in caplog.text
    train = [r for r in read_metrics(str(tmp_path / "wd")) if r["kind"] == "train"]
    lrs = [r["lr"] for r in train]
    # Step 4 is the first after the warm-up; timm's cosine (warmup_prefix=False) is already at
    # cos(pi * 3/30) there: 97.6% of the peak, the highest rate of the run.
    assert int(np.argmax(lrs)) == 3 and lrs[3] == pytest.approx(1e-5 + (3e-3 - 1e-5) * (1 + np.cos(np.pi / 10)) / 2)
    losses = [r["loss"] for r in train]
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.5, losses
    evals = [r["step"] for r in read_metrics(str(tmp_path / "wd")) if r["kind"] == "eval"]
    assert evals == list(range(1, 31)) and "evaluating every 1 steps" in caplog.text


def test_extending_a_finished_run_continues_from_its_checkpoint(data_dir, tmp_path, caplog):
    """A finished 10-step run, rerun with --num_steps 20, continues from step 10; with the
    schedule fixed by --num_epochs its new losses equal an uninterrupted 20-step run's."""
    kw = dict(num_epochs=40, num_steps=10, checkpoint_every=5, export=False, plot=False)
    short = _config(data_dir, tmp_path / "extended", **kw)
    first = trainer.train_and_evaluate(short, model_fn=create_tiny_model)
    assert first.final_step == 10 and not first.preempted
    with caplog.at_level(logging.INFO, logger="fastvit_jax.training"):
        extended = trainer.train_and_evaluate(short.replace(num_steps=20), model_fn=create_tiny_model)
    assert extended.resumed_from == 10 and extended.final_step == 20
    assert sorted(extended.losses) == list(range(11, 21))
    assert "run length changed (num_steps 10 -> 20): schedule recomputed" in caplog.text
    reference = trainer.train_and_evaluate(_config(data_dir, tmp_path / "uninterrupted", **dict(kw, num_steps=20)),
                                           model_fn=create_tiny_model)
    for step in range(11, 21):
        assert extended.losses[step] == pytest.approx(reference.losses[step], rel=1e-5, abs=1e-6), step
    # Without --num_epochs the schedule follows --num_steps and is recomputed for the longer run.
    again = trainer.train_and_evaluate(_config(data_dir, tmp_path / "extended2", num_steps=10, export=False,
                                               plot=False), model_fn=create_tiny_model)
    longer = trainer.train_and_evaluate(again.config.replace(num_steps=20), model_fn=create_tiny_model)
    assert longer.resumed_from == 10 and longer.plan.schedule_steps == 20
    lr_11 = [r["lr"] for r in read_metrics(str(tmp_path / "extended2")) if r["kind"] == "train" and r["step"] == 11]
    from fastvit_jax.training.optimizer import lr_schedule

    expected = lr_schedule(2e-3, total_steps=20, warmup_steps=2, warmup_lr=1e-6, min_lr=1e-5)(10)
    assert lr_11 == [pytest.approx(float(expected), rel=1e-5)]


def test_second_start_loads_the_train_step_from_the_compilation_cache(data_dir, tmp_path, caplog):
    cache = str(tmp_path / "jax_cache")
    cfg = _config(data_dir, tmp_path / "first", num_steps=2, compilation_cache_dir=cache, export=False, plot=False)
    first = trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    assert first.train_step_from_cache is False  # an empty cache
    with caplog.at_level(logging.DEBUG, logger="jax._src.compiler"):
        second = trainer.train_and_evaluate(cfg.replace(workdir=str(tmp_path / "second")),
                                            model_fn=create_tiny_model)
    assert second.train_step_from_cache is True
    assert "Persistent compilation cache hit for 'jit_train_step'" in caplog.text  # JAX's own word
    # Another run length (schedule, warm-up, EMA decay) is an input of the step, not a constant of it.
    third = trainer.train_and_evaluate(cfg.replace(workdir=str(tmp_path / "third"), num_steps=7, ema_decay=None),
                                       model_fn=create_tiny_model)
    assert third.plan.schedule_steps == 7 and third.plan.ema_decay != first.plan.ema_decay
    assert third.train_step_from_cache is True
    assert second.losses == first.losses


def test_init_from_new_head_and_eval_only_workdir(data_dir, tmp_path):
    """Fine-tune from a 10-class safetensors file into the 1000-class dataset: body loaded,
    head new; then --eval_only on the trainer workdir reports raw and EMA metrics."""
    import jax
    import jax.numpy as jnp

    import fastvit_jax

    src = TinyNet(num_classes=10).init({"params": jax.random.PRNGKey(7)}, jnp.zeros((1, 32, 32, 3)), train=False)
    path = fastvit_jax.save_variables(str(tmp_path / "pre.safetensors"), jax.device_get(src))
    cfg = _config(data_dir, tmp_path / "ft", init_from=path, num_steps=1, export=False, plot=False)
    res = trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    st = jax.device_get(res.state)
    assert st.params["head"]["fc"]["kernel"].shape == (16, 1000)
    # one AdamW step moves weights by ~lr; the loaded body is still close to the file's
    np.testing.assert_allclose(st.params["mix"]["kernel"], np.asarray(src["params"]["mix"]["kernel"]), atol=5e-3)
    m = evaluate_checkpoint(cfg.replace(eval_only=True, init_from=str(tmp_path / "ft")), model_fn=create_tiny_model)
    assert {"top1", "ema_top1", "loss", "ema_loss"} <= set(m) and m["num_examples"] == 8
    assert m["ema_loss"] == pytest.approx(res.eval["ema_loss"], rel=1e-5)  # the checkpoint's EMA weights


def test_missing_dataset_message(tmp_path):
    from fastvit_jax.data.pipeline import DatasetNotFoundError

    cfg = get_config("t8", dataset="imagenet2012", data_dir=str(tmp_path), workdir=str(tmp_path / "w"),
                     progress=False)
    with pytest.raises(DatasetNotFoundError, match="ILSVRC2012_img_train.tar"):
        trainer.train_and_evaluate(cfg)


def test_cli_missing_dataset_exit_code_and_help(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_tpu.py"), "--variant", "t8", "--data_dir",
                        str(tmp_path), "--workdir", str(tmp_path / "w")], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "not available" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, os.path.join(REPO, "train_tpu.py"), "--help"], capture_output=True,
                       text=True, env=env, timeout=120)
    assert r.returncode == 0
    for flag in ("--variant", "--dataset", "--mesh", "--init_from", "--eval_only", "--mixup", "--ema_decay",
                 "--lr_base", "--lr_base_size", "--compilation_cache_dir"):
        assert flag in r.stdout


@pytest.mark.slow
def test_cli_sigterm_subprocess(data_dir, tmp_path):
    """The real CLI, killed with SIGTERM mid-run, saves a checkpoint and exits 0."""
    import time

    wd = tmp_path / "wd"
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.join(REPO, "train_tpu.py"), "--variant", "t8", "--dataset", "imagenet2012",
           "--data_dir", data_dir, "--workdir", str(wd), "--global_batch_size", "16", "--image_size", "32",
           "--num_steps", "100000", "--checkpoint_every", "100000", "--log_every", "1", "--no_progress"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while time.time() < deadline:
        recs = read_metrics(str(wd))
        if any(r["kind"] == "train" and r["step"] >= 2 for r in recs):
            break
        time.sleep(1)
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-3000:]
    steps = [int(n) for n in os.listdir(wd / "checkpoints") if n.isdigit()]
    assert len(steps) == 1 and steps[0] >= 2
    assert "stopped (SIGTERM) at step" in err and "stopped at step" in out


def test_training_on_an_image_folder_exports_its_class_names(tmp_path):
    """--dataset PATH of class folders: trains, evaluates, and the export carries the folder's class names."""
    from fastvit_jax.io import load_metadata
    from test_data import _image_folder  # noqa: E402

    root = _image_folder(tmp_path / "pets", train=6, val=2)
    cfg = get_config("t8", dataset=str(root), workdir=str(tmp_path / "wd"), recipe="short", global_batch_size=8,
                     image_size=32, num_epochs=None, num_steps=4, checkpoint_every=2, log_every=1, eval_every=0,
                     eval_batch_size=8, progress=False, plot=False)
    res = trainer.train_and_evaluate(cfg, model_fn=create_tiny_model)
    assert res.final_step == 4 and res.eval["num_examples"] == 6 and res.config.num_classes == 3
    names = json.loads(load_metadata(res.export_path)["pretrained_cfg"])["label_names"]
    assert names == ["cat", "dog", "fox"]
