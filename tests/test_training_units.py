"""Unit tests of the trainer's pure pieces (8 fake CPU devices, no dataset, seconds)."""

import dataclasses
import json
import logging
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fastvit_jax.data.pipeline import device_prefetch
from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from fastvit_jax.training.config import (
    BOOKKEEPING_FIELDS,
    RUN_LENGTH_FIELDS,
    ConfigMismatchError,
    TrainConfig,
    check_workdir_config,
    get_config,
    write_workdir_config,
)
from fastvit_jax.training.ema import ema_update
from fastvit_jax.training.losses import eval_sums, soft_cross_entropy
from fastvit_jax.training.mixup import cutmix_box, mixup_cutmix, smooth_one_hot
from fastvit_jax.training.optimizer import lr_schedule, make_optimizer, weight_decay_mask
from fastvit_jax.training.state import create_state
from fastvit_jax.training.plan import make_plan
from fastvit_jax.training.pretrained import merge_pretrained
from fastvit_jax.training.trainer import NonFiniteLossError

from test_training_helpers import TinyNet  # noqa: E402  (tests/ is on sys.path)

ADAMW = dict(b1=0.9, b2=0.999, eps=1e-8)  # torch.optim.AdamW's
SCHEDULE = dict(warmup_steps=0, warmup_lr=1e-6, min_lr=1e-5)


@pytest.fixture(scope="module")
def tiny_variables():
    model = TinyNet(num_classes=10)
    return model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 16, 16, 3)), train=False)


# ---------------------------------------------------------------------------- config
def test_recipe_defaults_and_overrides():
    c = get_config("fastvit_sa12")
    assert c.variant == "sa12" and c.drop_path == 0.1 and c.mixup == 0.2 and c.cutmix == 1.0
    assert c.lr is None and c.lr_base == 1e-3 and c.lr_base_size == 1024 and c.weight_decay == 0.05
    assert c.warmup_epochs is None and c.warmup_steps is None and c.ema_decay is None
    assert c.label_smoothing == 0.1 and c.min_lr == 1e-5 and c.warmup_lr == 1e-6 and c.num_epochs == 300
    assert get_config("ma36").mixup == 0.8 and get_config("ma36").drop_path == 0.35
    assert get_config("t8").mixup == 0.2  # the recipe's per-variant value, not a generic default
    c2 = get_config("t8", global_batch_size=256, mixup=0.0)
    assert c2.mixup == 0.0 and TrainConfig.from_json(c2.to_json()) == c2
    assert get_config("t8", num_epochs=None, num_steps=5).num_epochs is None
    assert get_config("t8", randaugment="none").randaugment == ""
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        get_config("t8", nonsense=1)
    with pytest.raises(ValueError, match="unknown FastViT variant"):
        get_config("t9")


def test_lr_is_the_absolute_peak_and_lr_base_scales_with_batch():
    assert get_config("t8", global_batch_size=256).peak_lr == pytest.approx(2.5e-4)  # 1e-3 * 256 / 1024
    assert get_config("t8", global_batch_size=32, lr=1e-4).peak_lr == 1e-4  # --lr is not scaled
    assert get_config("t8", global_batch_size=512, lr_base=4e-3, lr_base_size=256).peak_lr == pytest.approx(8e-3)
    plan = make_plan(get_config("t8", global_batch_size=32, lr=1e-4, num_epochs=None, num_steps=30), 3000)
    assert plan.peak_lr == 1e-4 and "peak lr 0.0001" in plan.describe()


def test_workdir_config_mismatch_is_refused(tmp_path):
    wd = str(tmp_path / "wd")
    c = get_config("t8", workdir=wd, num_classes=10)
    assert check_workdir_config(wd, c) == {}  # a new workdir
    write_workdir_config(wd, c)
    assert json.load(open(os.path.join(wd, "config.json")))["variant"] == "t8"
    assert check_workdir_config(wd, c.replace(eval_every=7, data_dir="/elsewhere", mesh="data:-1,fsdp:2")) == {}
    assert check_workdir_config(wd, c.replace(num_steps=40)) == {"num_steps": (None, 40)}  # extending
    with pytest.raises(ConfigMismatchError) as e:
        check_workdir_config(wd, c.replace(variant="sa12", image_size=128))
    msg = str(e.value)
    assert "variant: workdir has 't8', this run has 'sa12'" in msg and "image_size" in msg
    assert "new --workdir" in msg and "lr_base" not in msg
    with pytest.raises(ConfigMismatchError, match="lr_base_size: workdir has 1024, this run has 256"):
        check_workdir_config(wd, c.replace(lr_base_size=256))  # the peak lr depends on it


def test_a_config_json_from_before_a_field_existed_resumes_with_its_default(tmp_path):
    wd = str(tmp_path / "wd")
    c = get_config("t8", workdir=wd, num_classes=10)
    older = {k: v for k, v in json.loads(c.to_json()).items() if not k.startswith("adam_")}
    os.makedirs(wd)
    with open(os.path.join(wd, "config.json"), "w") as f:
        json.dump(older, f)
    assert check_workdir_config(wd, c) == {}
    with pytest.raises(ConfigMismatchError, match="adam_eps: workdir has 1e-08, this run has 1e-06"):
        check_workdir_config(wd, c.replace(adam_eps=1e-6))


def test_every_field_is_protected_unless_listed():
    """A field added later is protected by default: only the named run-length and bookkeeping
    fields may change on a restart."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(RUN_LENGTH_FIELDS) | set(BOOKKEEPING_FIELDS) <= fields
    protected = fields - set(RUN_LENGTH_FIELDS) - set(BOOKKEEPING_FIELDS)
    assert {"variant", "dataset", "image_size", "global_batch_size", "seed", "lr", "lr_base", "lr_base_size",
            "warmup_steps", "mixup", "drop_path", "dtype", "randaugment"} <= protected


def test_plan_epochs_steps_and_small_dataset():
    c = get_config("t8", global_batch_size=100, num_epochs=10, warmup_epochs=2)
    p = make_plan(c, 1050)
    assert (p.steps_per_epoch, p.schedule_steps, p.warmup_steps, p.total_steps) == (10, 100, 20, 200)  # + 10 cool-down
    p = make_plan(c.replace(num_steps=7), 1050)
    assert p.total_steps == 7 and p.schedule_steps == 100
    p = make_plan(c.replace(num_epochs=None, num_steps=30, warmup_steps=3), 1050)
    assert (p.schedule_steps, p.warmup_steps, p.total_steps) == (30, 3, 30)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_plan(c, 50)


def test_eval_cadence_every_epoch_or_a_tenth_of_a_short_run():
    c = get_config("t8", global_batch_size=100, num_epochs=300)
    assert make_plan(c, 1050).eval_every == 10  # every epoch, as timm
    assert make_plan(c.replace(num_epochs=None, num_steps=30), 100_000).eval_every == 3  # shorter than an epoch
    assert make_plan(c.replace(eval_every=0), 1050).eval_every == 0  # only at the end
    assert make_plan(c.replace(eval_every=7), 1050).eval_every == 7


def test_recipe_warmup_is_scaled_to_fit_a_short_run():
    # The run: 3000 demo images at batch 32 -> 93 steps/epoch; 5 epochs = 465 steps > 30.
    short = get_config("t8", global_batch_size=32, num_epochs=None, num_steps=30)
    p = make_plan(short, 3000)
    assert p.warmup_steps == 3 and p.schedule_steps == 30  # 10% of the run
    warm = [n for n in p.notes if n.startswith("warm-up")]  # the EMA and lr notes: test_short_runs_...
    assert len(warm) == 1 and "465 steps" in warm[0] and "to 3 steps" in warm[0]
    # A long run keeps the recipe's 5 epochs, silently.
    p = make_plan(get_config("t8", global_batch_size=32, num_epochs=100), 3000)
    assert p.warmup_steps == 465 and not [n for n in p.notes if n.startswith("warm-up")]
    # What the user sets is kept, with a note when it never lets the lr reach its peak.
    assert make_plan(short.replace(warmup_steps=20), 3000).warmup_steps == 20
    assert make_plan(short.replace(warmup_epochs=0.1), 3000).warmup_steps == 9
    p = make_plan(short.replace(warmup_epochs=1), 3000)
    assert p.warmup_steps == 93 and "never reaches its peak" in p.notes[0]


# ---------------------------------------------------------------------------- schedule
def test_lr_schedule_known_values():
    s = lr_schedule(1e-3, total_steps=1000, warmup_steps=100, warmup_lr=1e-6, min_lr=1e-5)
    assert float(s(0)) == pytest.approx(1e-6)
    assert float(s(50)) == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-5)
    # timm warmup_prefix=False: after warm-up the cosine is at the absolute step.
    assert float(s(100)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.1)), rel=1e-5)
    assert float(s(500)) == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5), rel=1e-5)
    assert float(s(1000)) == pytest.approx(1e-5, rel=1e-5)
    assert float(s(1200)) == pytest.approx(1e-5, rel=1e-5)  # cool-down stays at min_lr
    s0 = lr_schedule(2e-3, total_steps=10, warmup_steps=0, warmup_lr=1e-6, min_lr=0.0)
    assert float(s0(0)) == pytest.approx(2e-3)


# ---------------------------------------------------------------------------- weight decay
def test_weight_decay_mask_leaf_by_leaf(tiny_variables):
    mask = weight_decay_mask(tiny_variables["params"])
    flat = {"/".join(str(k.key) for k in path): v for path, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat == {
        "stem/kernel": True,  # conv weight
        "bn/scale": False,  # BatchNorm affine
        "bn/bias": False,
        "mix/kernel": True,
        "mix/bias": False,  # conv bias
        "gamma": True,  # (C,) layer scale decays like the reference's (C,1,1)
        "head/fc/kernel": True,
        "head/fc/bias": False,
    }
    # And the optimizer applies it: with zero gradients only masked leaves shrink.
    params = jax.tree.map(jnp.ones_like, tiny_variables["params"])
    tx = make_optimizer(lambda _: 0.1, weight_decay=0.5, **ADAMW)
    upd, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    new = optax.apply_updates(params, upd)
    for path, v in jax.tree_util.tree_leaves_with_path(new):
        name = str(path[-1].key)
        expect = 1 - 0.1 * 0.5 if name in ("kernel", "gamma") else 1.0
        np.testing.assert_allclose(np.asarray(v), expect, rtol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------- mixup / cutmix
@pytest.mark.parametrize("mix,cut", [(0.8, 1.0), (0.2, 0.0), (0.0, 1.0), (0.0, 0.0)])
def test_mixup_cutmix_targets_sum_to_one(mix, cut):
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 16, 16, 3))
    y = jnp.arange(8) % 5
    for seed in range(6):
        xm, t, lam = mixup_cutmix(jax.random.PRNGKey(seed), x, y, num_classes=5, mixup_alpha=mix,
                                  cutmix_alpha=cut, switch_prob=0.5, label_smoothing=0.1)
        assert xm.shape == x.shape and t.shape == (8, 5)
        np.testing.assert_allclose(np.asarray(t.sum(-1)), 1.0, rtol=1e-6)
        lam = float(lam)
        assert 0.0 <= lam <= 1.0
        # Target weight on own label = lam*(on) + (1-lam)*(partner's contribution).
        on, off = 1 - 0.1 + 0.02, 0.02
        exp0 = lam * on + (1 - lam) * (on if int(y[0]) == int(y[-1]) else off)
        assert float(t[0, int(y[0])]) == pytest.approx(exp0, abs=1e-5)
        if mix == 0.0 and cut > 0:  # pure cutmix: lambda equals the kept-pixel fraction
            kept = float(jnp.mean(jnp.all(xm[0] == x[0], axis=-1)))
            assert lam == pytest.approx(kept, abs=1e-6)


def test_cutmix_box_is_clipped_and_lambda_corrected():
    for s in range(20):
        y0, y1, x0, x1 = (int(v) for v in cutmix_box(jax.random.PRNGKey(s), jnp.float32(0.3), 32, 20))
        assert 0 <= y0 <= y1 <= 32 and 0 <= x0 <= x1 <= 20
    t = smooth_one_hot(jnp.array([2]), 4, 0.2)
    np.testing.assert_allclose(np.asarray(t), [[0.05, 0.05, 0.85, 0.05]], rtol=1e-6)


# ---------------------------------------------------------------------------- EMA / losses
def test_ema_update_params_and_batch_stats():
    ema = {"params": {"w": jnp.zeros(3)}, "batch_stats": {"mean": jnp.full(2, 10.0)}}
    new = {"params": {"w": jnp.ones(3)}, "batch_stats": {"mean": jnp.zeros(2)}}
    out = ema_update(ema, new, 0.9)
    np.testing.assert_allclose(np.asarray(out["params"]["w"]), 0.1, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(out["batch_stats"]["mean"]), 9.0, rtol=1e-6)
    out2 = ema_update(out, new, 0.9)
    np.testing.assert_allclose(np.asarray(out2["params"]["w"]), 0.19, rtol=1e-6)


def test_losses_and_masked_eval_sums():
    logits = jnp.array([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    labels = jnp.array([1, 2, 0])
    s = eval_sums(logits, labels, jnp.array([1.0, 1.0, 0.0]))
    assert float(s["top1"]) == 1.0 and float(s["top5"]) == 2.0 and float(s["count"]) == 2.0
    t = jax.nn.one_hot(labels, 3)
    ref = -np.mean([jax.nn.log_softmax(logits[i])[int(labels[i])] for i in range(3)])
    assert float(soft_cross_entropy(logits, t)) == pytest.approx(float(ref), rel=1e-6)


# ---------------------------------------------------------------------------- sharding
def test_mesh_spec_parsing_and_errors():
    assert mesh_lib.parse_mesh_spec("data:-1", 8) == [("data", 8)]
    assert mesh_lib.parse_mesh_spec("data:-1,fsdp:4", 8) == [("data", 2), ("fsdp", 4)]
    for bad, msg in [("data:3", "has 3 devices"), ("model:2", "unknown mesh axis"),
                     ("data:-1,fsdp:-1", "at most one"), ("data:-1,fsdp:3", "not divisible"), ("data", "NAME:SIZE")]:
        with pytest.raises(ValueError, match=msg):
            mesh_lib.parse_mesh_spec(bad, 8)


def test_fsdp_rule():
    assert mesh_lib.fsdp_spec((384, 1000), 4, 1000) == P(None, "fsdp")  # largest dim divisible by 4
    assert mesh_lib.fsdp_spec((1002, 384), 4, 1000) == P(None, "fsdp")  # 1002 % 4 != 0: next largest
    assert mesh_lib.fsdp_spec((3, 3, 96, 6), 4, 10) == P(None, None, "fsdp", None)
    assert mesh_lib.fsdp_spec((7, 9), 4, 10) == P()  # nothing divisible
    assert mesh_lib.fsdp_spec((64,), 4, 1000) == P()  # small
    assert mesh_lib.fsdp_spec((64, 64), 1, 10) == P()  # no fsdp axis


@pytest.mark.parametrize("spec", ["data:-1", "data:-1,fsdp:4"])
def test_state_and_batch_sharding_on_8_devices(spec, tiny_variables):
    assert jax.device_count() == 8
    mesh = mesh_lib.create_mesh(spec)
    assert mesh.size == 8
    tx = make_optimizer(lr_schedule(1e-3, total_steps=10, **SCHEDULE), weight_decay=0.05, **ADAMW)
    abstract = jax.eval_shape(lambda v: create_state(v, tx), tiny_variables)
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=256)
    state = jax.jit(lambda v: create_state(v, tx), out_shardings=shardings)(tiny_variables)
    k = state.params["head"]["fc"]["kernel"]  # (16, 10): 160 elements < 256 -> replicated
    assert k.sharding.spec == P()
    mix = state.params["mix"]["kernel"]  # (3,3,16,16) = 2304 elements
    mu_mix = state.opt_state[0].mu["mix"]["kernel"]
    if "fsdp" in spec:
        assert mix.sharding.spec == P(None, None, "fsdp", None)
        assert mu_mix.sharding.spec == mix.sharding.spec
        assert state.ema_params["mix"]["kernel"].sharding.spec == mix.sharding.spec
        assert {s.data.shape for s in mix.addressable_shards} == {(3, 3, 4, 16)}
    else:
        assert mix.sharding.is_fully_replicated
    assert state.step.sharding.is_fully_replicated
    batch_sharding = mesh_lib.batch_sharding(mesh)
    assert batch_sharding.spec == (P(("data", "fsdp")) if "fsdp" in spec else P("data"))
    local = {"image": np.zeros((16, 8, 8, 3), np.float32), "label": np.arange(16, dtype=np.int32)}
    batch = next(device_prefetch([local], batch_sharding))
    assert batch["image"].shape == (16, 8, 8, 3)
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}  # 16 / 8 devices
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16))


def test_maybe_initialize_distributed_single_host_is_noop():
    from fastvit_jax.training import multihost

    assert multihost.maybe_initialize_distributed(env={}, distributed_timeout_s=300) is False
    assert multihost.want_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert multihost.want_distributed({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not multihost.want_distributed({"TPU_WORKER_HOSTNAMES": "localhost"})
    assert multihost.want_distributed({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"})
    assert multihost.want_distributed({"OMPI_COMM_WORLD_SIZE": "2"})
    assert not multihost.want_distributed({"OMPI_COMM_WORLD_SIZE": "1"})


def test_distributed_timeouts_reach_jax_distributed_initialize():
    """--distributed_timeout T: joining and shutdown wait T; JAX's heartbeat timeout is 4T, so JAX can
    notice a death 2T after it at the earliest, after the watchdog's report at T."""
    from fastvit_jax.training import multihost

    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert multihost.initialize_kwargs(env, distributed_timeout_s=30) == {
        "coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 3,
        "initialization_timeout": 30, "heartbeat_timeout_seconds": 120, "shutdown_timeout_seconds": 30}
    # Cluster auto-detection (SLURM, TPU pods, Open MPI): only the timeouts are given.
    assert multihost.initialize_kwargs({"SLURM_JOB_ID": "7"}, distributed_timeout_s=300) == {
        "initialization_timeout": 300, "heartbeat_timeout_seconds": 1200, "shutdown_timeout_seconds": 300}


# ---------------------------------------------------------------------------- checkpoint / init_from
def _sharded_state(mesh_spec: str, tiny_variables):
    """(state, abstract state with shardings) of the tiny model on ``mesh_spec``."""
    mesh = mesh_lib.create_mesh(mesh_spec)
    tx = make_optimizer(lr_schedule(1e-3, total_steps=10, **SCHEDULE), weight_decay=0.05, **ADAMW)
    abstract = jax.eval_shape(lambda v: create_state(v, tx), tiny_variables)
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=256)
    state = jax.jit(lambda v: create_state(v, tx), out_shardings=shardings)(tiny_variables)
    return state, abstract_with_shardings(abstract, shardings)


def test_checkpoint_roundtrip_sharded(tmp_path, tiny_variables):
    from fastvit_jax.training.checkpoint import save_replica_parallel

    # replicas write slices of replicated arrays in parallel on TPU only (on CPU it costs compiles)
    assert [save_replica_parallel(b) for b in ("tpu", "gpu", "cpu")] == [True, False, False]
    state, abstract = _sharded_state("data:-1,fsdp:4", tiny_variables)
    state = state.replace(step=state.step + 5)
    c = Checkpointer(str(tmp_path), max_to_keep=2)
    c.save(5, state)
    c.wait()
    restored, step = c.restore(abstract)
    c.close()
    assert int(restored.step) == 5 == step
    assert restored.params["mix"]["kernel"].sharding.spec == P(None, None, "fsdp", None)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _two_checkpoints(tmp_path, tiny_variables):
    state, abstract = _sharded_state("data:-1", tiny_variables)
    c = Checkpointer(str(tmp_path), max_to_keep=3)
    for step in (3, 6):
        c.save(step, state.replace(step=state.step + step))
        c.wait()
    c.close()
    return abstract


def _damage(step_dir, how: str) -> None:
    files = [os.path.join(root, name) for root, _, names in os.walk(step_dir) for name in names]
    if how == "truncated data":
        for path in files:
            if os.path.getsize(path) > 64 and "METADATA" not in os.path.basename(path):
                with open(path, "r+b") as f:
                    f.truncate(16)
    else:
        for path in files:
            if os.path.basename(path) == "_METADATA":
                os.remove(path)


@pytest.mark.parametrize("how", ["truncated data", "no _METADATA"])
def test_corrupt_newest_checkpoint_is_moved_aside(tmp_path, tiny_variables, caplog, how):
    abstract = _two_checkpoints(tmp_path, tiny_variables)
    _damage(tmp_path / "checkpoints" / "6", how)
    c = Checkpointer(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="fastvit_jax.training"):
        restored, step = c.restore(abstract)
    c.close()
    assert step == 3 and int(restored.step) == 3
    aside = [n for n in os.listdir(tmp_path / "checkpoints") if n.startswith("6.corrupt-")]
    assert len(aside) == 1 and "checkpoint step 6 is unreadable" in caplog.text and aside[0] in caplog.text


def test_no_readable_checkpoint_names_every_step(tmp_path, tiny_variables):
    from fastvit_jax.training.checkpoint import CheckpointError, restore_eval_variables

    abstract = _two_checkpoints(tmp_path, tiny_variables)
    for step in ("3", "6"):
        _damage(tmp_path / "checkpoints" / step, "truncated data")
    eval_abstract = {k: getattr(abstract, k) for k in ("params", "batch_stats", "ema_params", "ema_batch_stats")}
    with pytest.raises(CheckpointError, match=r"no readable checkpoint .*tried step 6: .*; step 3: "):
        restore_eval_variables(str(tmp_path), eval_abstract)
    assert sorted(n.split(".")[0] for n in os.listdir(tmp_path / "checkpoints") if ".corrupt-" in n) == ["3", "6"]


@pytest.mark.parametrize("other", [dict(num_classes=10, width=8), dict(num_classes=3)])
def test_a_checkpoint_of_another_model_is_refused_never_moved(tmp_path, tiny_variables, other):
    """Another width (a mistyped --variant) or class count: CheckpointMismatchError naming the
    tensor and both shapes, for the train restore and the eval-only partial restore; every step
    stays where it was, and the right model still restores."""
    from fastvit_jax.training.checkpoint import CheckpointMismatchError, restore_eval_variables

    abstract = _two_checkpoints(tmp_path, tiny_variables)
    before = sorted(os.listdir(tmp_path / "checkpoints"))
    wrong = TinyNet(**other).init({"params": jax.random.PRNGKey(1)}, jnp.zeros((1, 16, 16, 3)), train=False)
    tx = make_optimizer(lr_schedule(1e-3, total_steps=10, **SCHEDULE), weight_decay=0.05, **ADAMW)
    wrong_abstract = jax.eval_shape(lambda v: create_state(v, tx), wrong)
    c = Checkpointer(str(tmp_path))
    with pytest.raises(CheckpointMismatchError, match=r"checkpoint step 6 .* holds another model: params/.* is "
                                                      r"\(.*\) in the checkpoint, \(.*\) in this model.*Nothing "
                                                      r"was moved"):
        c.restore(wrong_abstract)
    c.close()
    eval_abstract = {k: getattr(wrong_abstract, k) for k in ("params", "batch_stats", "ema_params", "ema_batch_stats")}
    with pytest.raises(CheckpointMismatchError):
        restore_eval_variables(str(tmp_path), eval_abstract)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == before
    c = Checkpointer(str(tmp_path))
    assert c.restore(abstract)[1] == 6
    c.close()


def test_merge_pretrained_new_head_and_mismatch(tiny_variables):
    fresh = jax.device_get(TinyNet(num_classes=3).init({"params": jax.random.PRNGKey(5)},
                                                         jnp.zeros((1, 16, 16, 3)), train=False))
    merged, notes = merge_pretrained(dict(fresh), dict(jax.device_get(tiny_variables)))
    np.testing.assert_array_equal(merged["params"]["mix"]["kernel"], tiny_variables["params"]["mix"]["kernel"])
    np.testing.assert_array_equal(merged["params"]["head"]["fc"]["kernel"], fresh["params"]["head"]["fc"]["kernel"])
    assert any("new classifier head" in n for n in notes)
    bad = jax.device_get(TinyNet(num_classes=10, width=8).init({"params": jax.random.PRNGKey(5)},
                                                                 jnp.zeros((1, 16, 16, 3)), train=False))
    with pytest.raises(ValueError, match="wrong shape"):
        merge_pretrained(dict(fresh), dict(bad))
    from fastvit_jax.weights.state_dict import ConversionError, describe_variables

    with pytest.raises(ConversionError, match=r"holds no FastViT blocks \(no stages.<i>.blocks.<j>.\* keys"):
        describe_variables(fresh)  # at once: not by tracing all twelve variants (50 s)


def test_nonfinite_error_message():
    e = NonFiniteLossError(17, float("nan"), 10)
    assert "step 17" in str(e) and "Last good checkpoint: step 10" in str(e)


def _cli():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_tpu", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_tpu.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli


def test_cli_flags_to_config():
    cli = _cli()
    args = cli.build_parser().parse_args(
        ["--variant", "sa24", "--num_steps", "100", "--mesh", "data:-1,fsdp:4", "--mixup", "0", "--lr", "2e-3",
         "--randaugment", "none", "--rrc_scale", "0.2", "1.0", "--no_export", "--eval_every", "10"])
    c = cli.config_from_args(args)
    assert c.variant == "sa24" and c.drop_path == 0.1 and c.num_steps == 100 and c.num_epochs is None
    assert c.mesh == "data:-1,fsdp:4" and c.mixup == 0.0 and c.cutmix == 1.0 and c.lr == 2e-3 == c.peak_lr
    assert c.randaugment == "" and c.rrc_scale == (0.2, 1.0) and not c.export and c.eval_every == 10
    c = cli.config_from_args(cli.build_parser().parse_args(["--num_epochs", "30"]))
    assert c.num_epochs == 30 and c.num_steps is None and c.dataset == "imagenet2012" and c.image_size == 256
    assert c == get_config("t8", num_epochs=30)  # flags not given keep the recipe
    c = cli.config_from_args(cli.build_parser().parse_args(["--num_steps", "9", "--num_epochs", "none",
                                                            "--clip_grad", "1.5", "--lr_base", "5e-4"]))
    assert c.num_epochs is None and c.clip_grad == 1.5 and c.lr_base == 5e-4 and c.lr is None


def test_cli_has_one_flag_per_config_field():
    flags = {a.dest for a in _cli().build_parser()._actions}
    switches = {"eval_only": "eval_only", "export": "no_export", "plot": "no_plot", "progress": "no_progress"}
    for field in dataclasses.fields(TrainConfig):
        assert switches.get(field.name, field.name) in flags, field.name
        assert field.metadata["help"], field.name


# ---------------------------------------------------------------------------- outputs
def test_curves_have_a_learning_rate_panel_and_eval_curves(tmp_path):
    from fastvit_jax.training.metrics import MetricWriter, plot_curves

    writer = MetricWriter(str(tmp_path), tensorboard=False)
    for step in range(1, 11):
        writer.write(step, "train", {"loss": 3.0 - 0.1 * step, "lr": 1e-4 * step})
        if step % 5 == 0:
            writer.write(step, "eval", {"loss": 2.0, "top1": 0.1 * step, "top5": 0.5, "ema_loss": 2.1,
                                        "ema_top1": 0.05 * step, "ema_top5": 0.4})
    writer.close()
    import matplotlib.pyplot as plt

    created = []
    real_subplots = plt.subplots

    def recording_subplots(*args, **kwargs):
        fig, axes = real_subplots(*args, **kwargs)
        created.append(axes)
        return fig, axes

    plt.subplots = recording_subplots
    try:
        path = plot_curves(str(tmp_path))
    finally:
        plt.subplots = real_subplots
    assert os.path.getsize(path) > 1000
    ax_loss, ax_acc, ax_lr = created[0]
    assert ax_lr.get_title() == "learning rate" and ax_lr.get_shared_x_axes().joined(ax_lr, ax_loss)
    np.testing.assert_allclose(ax_lr.lines[0].get_ydata(), [1e-4 * s for s in range(1, 11)])
    assert [len(line.get_xdata()) for line in ax_acc.lines] == [2, 2, 2, 2]  # two evals: a curve each


def test_tensorboard_reads_the_event_files(tmp_path):
    """Read back by TensorBoard's own reader (the one behind its Scalars dashboard)."""
    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.util import tensor_util

    from fastvit_jax.training.metrics import MetricWriter

    writer = MetricWriter(str(tmp_path))
    writer.write(1, "train", {"loss": 2.5, "lr": 1e-4})
    writer.write(2, "train", {"loss": 2.0, "lr": 2e-4})
    writer.close()
    events = plugin_event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert {"train/loss", "train/lr"} <= set(events.PluginTagToContent("scalars"))
    loss = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in events.Tensors("train/loss")]
    assert loss == [(1, 2.5), (2, 2.0)]


def test_compilation_cache_dir_resolution(monkeypatch):
    from fastvit_jax.training.compile_cache import resolve_cache_dir

    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert resolve_cache_dir(None) == os.path.expanduser("~/.cache/fastvit_jax/jax")
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/tmp/jc")
    assert resolve_cache_dir(None) == "/tmp/jc"
    assert resolve_cache_dir("/x/y") == "/x/y" and resolve_cache_dir("none") is None


def test_post_compilation_barrier_waits_for_the_slower_process(tmp_path):
    """Two real processes (jax.distributed on localhost): process 0 passes the barrier only
    after process 1, still 'compiling' for 3 s, has reached it (it leaves a file just before)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    marker = tmp_path / "process1_reached_the_barrier"
    script = tmp_path / "barrier.py"
    script.write_text(
        "import pathlib, sys, time\n"
        "import jax\n"
        "pid = int(sys.argv[1])\n"
        f"jax.distributed.initialize(coordinator_address='localhost:{port}', num_processes=2, process_id=pid)\n"
        "from fastvit_jax.training.multihost import barrier\n"
        f"marker = pathlib.Path({str(marker)!r})\n"
        "if pid == 1:\n"
        "    time.sleep(3)\n"
        "    marker.write_text('here')\n"
        "barrier('compiled', 60, 'the other to compile')\n"
        "print('marker seen after the barrier:', marker.exists())\n"
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, str(script), str(pid)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for pid in (0, 1)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[0][0].strip() == "marker seen after the barrier: True"


def test_data_normalization_follows_the_variant():
    """The trainer normalises with the model's data config: ImageNet for FastViT, 0/1 or CLIP for the towers."""
    assert get_config("t8").normalization == {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    assert get_config("mci0").normalization == {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
    assert get_config("mci3").normalization["mean"] == pytest.approx((0.48145466, 0.4578275, 0.40821073))


def test_torn_metrics_config_and_topology_files(tmp_path, caplog):
    """A torn last line of metrics.jsonl is dropped with a warning (the next record starts on
    its own line); a damaged earlier line, a torn config.json or topology.json is a ValueError
    naming the file and the fix."""
    from fastvit_jax.training.config import read_workdir_config
    from fastvit_jax.training.metrics import MetricWriter, read_metrics
    from fastvit_jax.training.multihost import topology_change

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "kind": "train", "loss": 2.0}\n{"step": 2, "kind": "tr')
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1]
    with caplog.at_level(logging.WARNING, logger="fastvit_jax.training"):
        writer = MetricWriter(str(tmp_path), tensorboard=False)
    assert "dropped a torn last line (23 bytes" in caplog.text
    writer.write(2, "train", {"loss": 1.5})
    writer.close()
    assert [r["step"] for r in read_metrics(str(tmp_path))] == [1, 2]
    path.write_text('{"step": 1, "kind": "train"}\n{"step": 2, "ki\n{"step": 3, "kind": "train"}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl line 2 is not a JSON record"):
        read_metrics(str(tmp_path))

    (tmp_path / "config.json").write_text('{"variant": "t8", "dataset": "imagen')
    with pytest.raises(ValueError, match=r"config\.json is torn or not JSON \(Unterminated string starting at: line 1 "
                                         r"column 30, 36 bytes\); .*delete it and rerun with the run's own flags"):
        read_workdir_config(str(tmp_path))
    (tmp_path / "topology.json").write_text('{"process_count": 1, "dev')
    with pytest.raises(ValueError, match=r"topology\.json is torn or not JSON .*delete it and rerun"):
        topology_change(str(tmp_path), 5)


def test_flags_not_given_come_from_the_workdirs_config(tmp_path):
    """`--num_steps 140` alone extends a run: every other field is the workdir's (which the restart
    check then accepts); --eval_only evaluates at its variant, classes and size; --init_from and the
    switches are never inherited. Without config.json the recipe applies."""
    cli = _cli()
    saved = get_config("sa12", dataset="demo", image_size=64, global_batch_size=32, num_epochs=None, num_steps=100,
                       lr=2e-3, num_classes=10, workdir=str(tmp_path), mixup=0.0, randaugment="", ema_decay=0.95,
                       init_from=None, rrc_scale=(0.35, 1.0))
    write_workdir_config(str(tmp_path), saved)
    c = cli.config_from_args(cli.build_parser().parse_args(["--workdir", str(tmp_path), "--num_steps", "140"]))
    assert c == saved.replace(num_steps=140)
    assert set(check_workdir_config(str(tmp_path), c)) == {"num_steps"}
    c = cli.config_from_args(cli.build_parser().parse_args(["--workdir", str(tmp_path), "--eval_only"]))
    assert c.eval_only and (c.variant, c.image_size, c.num_classes, c.init_from) == ("sa12", 64, 10, None)
    c = cli.config_from_args(cli.build_parser().parse_args(["--workdir", str(tmp_path), "--variant", "t8",
                                                            "--no_export"]))
    assert c.variant == "t8" and c.image_size == 64 and not c.export
    with pytest.raises(ConfigMismatchError, match="variant: workdir has 'sa12', this run has 't8'"):
        check_workdir_config(str(tmp_path), c)
    fresh = cli.config_from_args(cli.build_parser().parse_args(["--workdir", str(tmp_path / "new"), "--num_steps",
                                                                "9"]))
    assert fresh == get_config("t8", workdir=str(tmp_path / "new"), num_steps=9, num_epochs=None)


def test_eval_only_of_a_file_takes_its_size_crop_and_variant(tmp_path):
    """--eval_only --init_from an export evaluates at the size, crop and variant in its header unless
    given: a 48 px export is not evaluated at 256 px."""
    import fastvit_jax

    model = fastvit_jax.create_model("t8", num_classes=10, inference_mode=True,
                                     pretrained_cfg=fastvit_jax.pretrained_cfg("t8", num_classes=10, image_size=48)
                                     .replace(crop_pct=1.0))
    variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 48, 48, 3))))
    path = str(tmp_path / "fused.safetensors")
    fastvit_jax.save_variables(path, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), variables), model=model)
    cli = _cli()
    args = ["--workdir", str(tmp_path / "wd"), "--eval_only", "--init_from", path]
    c = cli.config_from_args(cli.build_parser().parse_args(args))
    assert (c.variant, c.image_size, c.crop_pct) == ("t8", 48, 1.0)
    c = cli.config_from_args(cli.build_parser().parse_args(args + ["--image_size", "64"]))
    assert (c.image_size, c.crop_pct) == (64, 1.0)


def test_short_runs_scale_the_ema_and_name_a_small_lr():
    """The --help example (demo, batch 32, 150 steps): the recipe's EMA horizon (2000 steps) is scaled to
    15 steps and the linearly scaled lr (3.1e-5) is named with the fix; long runs keep the recipe's."""
    short = get_config("t8", dataset="demo", global_batch_size=32, num_epochs=None, num_steps=150)
    p = make_plan(short, 3000)
    assert p.ema_decay == pytest.approx(1 - 1 / 15) and p.peak_lr == pytest.approx(3.125e-5)
    assert any("EMA decay scaled from the recipe's 0.9995 (a 2000-step horizon) to 0.9333 (15 steps" in n
               for n in p.notes), p.notes
    assert any("peak lr 3.13e-05" in n and "--recipe short" in n for n in p.notes), p.notes
    p = make_plan(short.replace(recipe="short", lr=2e-3), 3000)
    assert not any("peak lr" in n for n in p.notes) and p.peak_lr == 2e-3
    assert make_plan(short.replace(ema_decay=0.99), 3000).ema_decay == 0.99  # as given
    long = make_plan(get_config("t8", global_batch_size=1024), 1_281_167)
    assert long.ema_decay == 0.9995 and long.notes == ()


def test_a_long_compilation_is_announced_and_ticks(caplog):
    import time as _time

    from fastvit_jax.training.compile_cache import announce_compilation

    with caplog.at_level(logging.INFO, logger="fastvit_jax.training"):
        with announce_compilation("the train step", "/cache", every_s=0.05):
            _time.sleep(0.2)
        with announce_compilation("the eval step", None, every_s=10):
            pass
    assert "compiling the train step (minutes on a CPU host, unless it is in the cache); it is kept in the " \
           "compilation cache (/cache) for the next start" in caplog.text
    assert caplog.text.count("still compiling the train step") >= 2
    assert "the compilation cache is off" in caplog.text and "still compiling the eval step" not in caplog.text


def test_every_field_has_one_help_section():
    from fastvit_jax.training.flags import FLAG_GROUPS

    grouped = [name for names in FLAG_GROUPS.values() for name in names]
    assert sorted(grouped) == sorted(f.name for f in dataclasses.fields(TrainConfig))
    cli = _cli()
    text = cli.build_parser().format_help()
    positions = [text.index(f"\n{title}:") for title in FLAG_GROUPS]
    assert positions == sorted(positions) and text.index("  --randaugment") > text.index("\naugmentation:")


def test_init_from_another_variant_or_a_fused_file_names_what_it_holds():
    """--init_from a t12 checkpoint into t8 names t12 and the flag; a fused file says it cannot be fine-tuned."""
    import fastvit_jax

    def zeros(variant, inference_mode=False):
        model = fastvit_jax.create_model(variant, num_classes=10, inference_mode=inference_mode)
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), dict(shapes))

    t8 = zeros("t8")
    with pytest.raises(ValueError, match=r"the file holds FastViT-t12 weights, this run trains t8: pass --variant t12"):
        merge_pretrained(t8, zeros("t12"))
    with pytest.raises(ValueError, match=r"the file holds fused FastViT-t8 weights: a fused export can be evaluated"):
        merge_pretrained(t8, zeros("t8", inference_mode=True))


def test_remat_setting():
    from fastvit_jax.training.setup import resolve_remat

    assert resolve_remat("auto") == "none"  # CPU
    assert (resolve_remat("auto", "tpu"), resolve_remat("auto", "gpu")) == ("none", "elementwise")
    assert resolve_remat("block") == "block" and get_config("t8").remat == "auto"
    with pytest.raises(ValueError, match="unknown remat policy 'some'"):
        get_config("t8", remat="some").validate()
