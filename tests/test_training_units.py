"""Unit tests of the trainer's pure pieces (8 fake CPU devices, no dataset, seconds)."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from fastvit_jax.training import mesh as mesh_lib
from fastvit_jax.training.checkpoint import Checkpointer, abstract_with_shardings
from fastvit_jax.training.config import (
    ConfigMismatchError,
    TrainConfig,
    check_or_write_workdir_config,
)
from fastvit_jax.training.ema import ema_update
from fastvit_jax.training.losses import eval_sums, soft_cross_entropy
from fastvit_jax.training.mixup import cutmix_box, mixup_cutmix, smooth_one_hot
from fastvit_jax.training.optimizer import lr_schedule, make_optimizer, weight_decay_mask
from fastvit_jax.training.state import create_state
from fastvit_jax.training.trainer import NonFiniteLossError, make_plan, merge_pretrained

from test_training_helpers import TinyNet  # noqa: E402  (tests/ is on sys.path)


@pytest.fixture(scope="module")
def tiny_variables():
    model = TinyNet(num_classes=10)
    return model.init({"params": jax.random.PRNGKey(0)}, jnp.zeros((1, 16, 16, 3)), train=False)


# ---------------------------------------------------------------------------- config
def test_recipe_defaults_and_overrides():
    c = TrainConfig.from_recipe("fastvit_sa12")
    assert c.variant == "sa12" and c.drop_path == 0.1 and c.mixup == 0.2 and c.cutmix == 1.0
    assert c.lr == 1e-3 and c.weight_decay == 0.05 and c.warmup_epochs == 5 and c.ema_decay == 0.9995
    assert c.label_smoothing == 0.1 and c.min_lr == 1e-5 and c.warmup_lr == 1e-6 and c.num_epochs == 300
    assert TrainConfig.from_recipe("ma36").mixup == 0.8 and TrainConfig.from_recipe("ma36").drop_path == 0.35
    c2 = TrainConfig.from_recipe("t8", global_batch_size=256, mixup=0.0)
    assert c2.peak_lr == pytest.approx(2.5e-4) and c2.mixup == 0.0 and c2.lr == 1e-3
    assert TrainConfig.from_json(c2.to_json()) == c2
    assert TrainConfig.from_recipe("t8", num_epochs=None, num_steps=5).num_epochs is None
    with pytest.raises(ValueError, match="unknown TrainConfig"):
        TrainConfig.from_recipe("t8", nonsense=1)
    with pytest.raises(ValueError, match="unknown FastViT variant"):
        TrainConfig.from_recipe("t9")


def test_workdir_config_mismatch_is_refused(tmp_path):
    wd = str(tmp_path / "wd")
    c = TrainConfig.from_recipe("t8", workdir=wd, num_classes=10)
    check_or_write_workdir_config(wd, c)
    assert json.load(open(os.path.join(wd, "config.json")))["variant"] == "t8"
    check_or_write_workdir_config(wd, c.replace(eval_every=7, data_dir="/elsewhere"))  # harmless fields
    with pytest.raises(ConfigMismatchError) as e:
        check_or_write_workdir_config(wd, c.replace(variant="sa12", image_size=128))
    msg = str(e.value)
    assert "variant: workdir has 't8', this run has 'sa12'" in msg and "image_size" in msg
    assert "new --workdir" in msg


def test_plan_epochs_steps_and_small_dataset():
    c = TrainConfig.from_recipe("t8", global_batch_size=100, num_epochs=10, warmup_epochs=2)
    p = make_plan(c, 1050)
    assert (p.steps_per_epoch, p.schedule_steps, p.warmup_steps, p.total_steps) == (10, 100, 20, 100)
    p = make_plan(c.replace(num_steps=7), 1050)
    assert p.total_steps == 7 and p.schedule_steps == 100
    p = make_plan(c.replace(num_epochs=None, num_steps=30, warmup_steps=3), 1050)
    assert (p.schedule_steps, p.warmup_steps, p.total_steps) == (30, 3, 30)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        make_plan(c, 50)


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
    s0 = lr_schedule(2e-3, total_steps=10, warmup_steps=0, min_lr=0.0)
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
    tx = make_optimizer(lambda _: 0.1, weight_decay=0.5)
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
                                  cutmix_alpha=cut, label_smoothing=0.1)
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
    tx = make_optimizer(lr_schedule(1e-3, total_steps=10), weight_decay=0.05)
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
    bsh = mesh_lib.batch_sharding(mesh)
    assert bsh.spec == (P(("data", "fsdp")) if "fsdp" in spec else P("data"))
    local = {"image": np.zeros((16, 8, 8, 3), np.float32), "label": np.arange(16, dtype=np.int32)}
    batch = mesh_lib.make_global_batch(local, bsh)
    assert batch["image"].shape == (16, 8, 8, 3)
    assert {s.data.shape[0] for s in batch["image"].addressable_shards} == {2}  # 16 / 8 devices
    np.testing.assert_array_equal(np.asarray(batch["label"]), np.arange(16))


def test_maybe_initialize_distributed_single_host_is_noop():
    assert mesh_lib.maybe_initialize_distributed(env={}) is False
    assert mesh_lib._want_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
    assert mesh_lib._want_distributed({"TPU_WORKER_HOSTNAMES": "a,b,c,d"})
    assert not mesh_lib._want_distributed({"TPU_WORKER_HOSTNAMES": "localhost"})


# ---------------------------------------------------------------------------- checkpoint / init_from
def test_checkpoint_roundtrip_sharded(tmp_path, tiny_variables):
    mesh = mesh_lib.create_mesh("data:-1,fsdp:4")
    tx = make_optimizer(lr_schedule(1e-3, total_steps=10), weight_decay=0.05)
    abstract = jax.eval_shape(lambda v: create_state(v, tx), tiny_variables)
    shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size=256)
    state = jax.jit(lambda v: create_state(v, tx), out_shardings=shardings)(tiny_variables)
    state = state.replace(step=state.step + 5)
    c = Checkpointer(str(tmp_path), max_to_keep=2)
    c.save(5, state)
    c.wait()
    restored = c.restore(abstract_with_shardings(abstract, shardings))
    c.close()
    assert int(restored.step) == 5
    assert restored.params["mix"]["kernel"].sharding.spec == P(None, None, "fsdp", None)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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


def test_nonfinite_error_message():
    e = NonFiniteLossError(17, float("nan"), 10)
    assert "step 17" in str(e) and "Last good checkpoint: step 10" in str(e)


def test_cli_flags_to_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "train_tpu", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train_tpu.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    args = cli.build_parser().parse_args(
        ["--variant", "sa24", "--num_steps", "100", "--mesh", "data:-1,fsdp:4", "--mixup", "0", "--lr", "2e-3",
         "--randaugment", "none", "--rrc_scale", "0.2", "1.0", "--no_export", "--eval_every", "10"])
    c = cli.config_from_args(args)
    assert c.variant == "sa24" and c.drop_path == 0.1 and c.num_steps == 100 and c.num_epochs is None
    assert c.mesh == "data:-1,fsdp:4" and c.mixup == 0.0 and c.cutmix == 1.0 and c.lr == 2e-3
    assert c.randaugment == "" and c.rrc_scale == (0.2, 1.0) and not c.export and c.eval_every == 10
    c = cli.config_from_args(cli.build_parser().parse_args(["--num_epochs", "30"]))
    assert c.num_epochs == 30 and c.num_steps is None and c.dataset == "imagenet2012" and c.image_size == 256
