"""What runs in bfloat16: the lowered training step of a bfloat16 model has no convolution or
matmul with a float32 operand or result (forward, backward and, under remat, the recomputed
forward), so XLA:GPU / TPU run them in bfloat16 (float32 accumulation inside the kernels); a
float32 model stays float32.

The StableHLO is read, not the optimised HLO of this host: XLA:CPU itself converts bfloat16
convolutions to float32 (and expands depthwise weight gradients into dense convolutions), which
says nothing about the accelerators' programs."""

import functools
import re

import jax
import jax.numpy as jnp
import pytest

import fastvit_jax
from fastvit_jax.training.config import get_config
from fastvit_jax.training.optimizer import make_optimizer
from fastvit_jax.training.plan import make_plan
from fastvit_jax.training.state import create_state, init_variables
from fastvit_jax.training.steps import make_train_step, run_args, schedule_of
from helpers import jit_init


@functools.lru_cache(maxsize=4)
def lowered_train_step(variant: str, dtype, lowering: str = "native", image_size: int = 64,
                       remat: str = "none") -> str:
    """StableHLO text of the real train step (mixup/cutmix on, batch 2) for ``variant``."""
    cfg = get_config(variant, num_classes=10, image_size=image_size, global_batch_size=2, num_epochs=None,
                     num_steps=10)
    model = fastvit_jax.create_model(variant, num_classes=10, dtype=dtype, lowering=lowering, remat=remat)

    def optimizer_for(schedule):
        return make_optimizer(schedule, weight_decay=cfg.weight_decay, b1=cfg.adam_b1, b2=cfg.adam_b2,
                              eps=cfg.adam_eps)

    args = run_args(make_plan(cfg, 100), cfg)
    state = jax.eval_shape(lambda: create_state(init_variables(model, image_size), optimizer_for(schedule_of(args))))
    batch = {"image": jax.ShapeDtypeStruct((2, image_size, image_size, 3), jnp.float32),
             "label": jax.ShapeDtypeStruct((2,), jnp.int32)}
    step = make_train_step(model, optimizer_for, cfg)
    return jax.jit(step).lower(state, batch, jax.random.PRNGKey(0), args).as_text()


def ops(text: str, name: str) -> list:
    """The type signatures ('(operand types) -> result type') of every ``stablehlo.<name>``."""
    return [line.rsplit(" : ", 1)[-1] for line in text.splitlines() if f"stablehlo.{name}" in line]


@pytest.mark.parametrize("variant, remat", [("t8", "none"), ("sa12", "none"), ("sa12", "elementwise"),
                                            ("t8", "block")])
def test_bfloat16_training_step_has_no_float32_convolutions_or_matmuls(variant, remat):
    text = lowered_train_step(variant, jnp.bfloat16, remat=remat)
    convs, dots = ops(text, "convolution"), ops(text, "dot_general")
    assert len(convs) > 100 and dots
    for signature in convs + dots:
        assert "f32" not in signature and re.search(r"xbf16>", signature), signature
    if remat != "none":  # the backward's recomputed forward is there too, in bfloat16
        assert "stablehlo.optimization_barrier" in text
        convs_none = ops(lowered_train_step(variant, jnp.bfloat16), "convolution")
        # elementwise keeps every conv output (recomputes no conv); block recomputes them
        assert len(convs) == len(convs_none) if remat == "elementwise" else len(convs) > len(convs_none)


def test_float32_model_stays_float32():
    convs = ops(lowered_train_step("t8", jnp.float32), "convolution")
    assert convs and all("bf16" not in s and "xf32>" in s for s in convs)


def test_remat_policies_give_the_same_gradients_and_keep_less():
    """elementwise / block recompute in the backward what none keeps: the same loss, gradients and
    batch statistics; fewer bytes kept per image (none > elementwise > block)."""
    import numpy as np

    from benchmarks.saved_set import per_image

    x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))  # sa12: RepMixer and attention blocks
    results = {}
    for policy in ("none", "elementwise", "block"):
        model = fastvit_jax.create_model("sa12", num_classes=10, lowering="native", remat=policy)
        variables = jit_init(model)(jax.random.PRNGKey(0), x[:1])

        def loss(params):
            logits, updates = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                          train=True, mutable=["batch_stats"])
            return (logits ** 2).sum(), updates

        results[policy] = jax.jit(jax.value_and_grad(loss, has_aux=True))(variables["params"])
    for policy in ("elementwise", "block"):
        for a, b in zip(jax.tree.leaves(results[policy]), jax.tree.leaves(results["none"])):
            # float32 recomputation reassociates sums with cancellation (a 1x1 kernel's gradient sums
            # B*H*W terms far larger than itself): up to 2.4e-5 of the leaf's largest entry on an
            # AVX-512 Xeon, under 1e-5 on AMD EPYC. The 1e-6 floor is for leaves that are zero up to rounding
            # (a BatchNorm bias feeding another BatchNorm).
            atol = max(1e-6, 1e-4 * float(np.abs(b).max()))
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=atol)
    kept = {policy: per_image("t8", policy, image_size=64) for policy in ("none", "elementwise", "block")}
    assert kept["none"] > 1.5 * kept["elementwise"] and kept["elementwise"] > kept["block"] > 0, kept
    with pytest.raises(ValueError, match="unknown remat policy 'all'; valid: none, elementwise, block"):
        fastvit_jax.create_model("t8", remat="all")


def test_the_model_hands_its_compute_policy_to_every_layer():
    """dtype, lowering and remat are one ``ComputePolicy`` on the model; no layer carries a lowering
    or remat field, and a ``dtype`` field only where a layer overrides the policy on purpose. A model
    jitted as a static argument is retraced for another policy; layers alone follow ``compute_policy``."""
    import dataclasses

    import flax.linen as nn

    from fastvit_jax import layers, model as model_module
    from fastvit_jax.policy import ComputePolicy, compute_policy, current_policy

    modules = [m for mod in (layers, model_module) for m in vars(mod).values()
               if isinstance(m, type) and issubclass(m, nn.Module) and m.__module__ == mod.__name__]
    assert len(modules) > 15
    fields = {m.__name__: {f.name for f in dataclasses.fields(m)} for m in modules}
    assert not [n for n, f in fields.items() if f & {"lowering", "remat"}]
    assert {n for n, f in fields.items() if "dtype" in f} == {"Conv2d", "BatchNorm", "ConvNorm", "LayerScale2d",
                                                              "MobileOneBlock"}
    assert [n for n, f in fields.items() if "policy" in f] == ["FastVit"]

    x = jnp.zeros((1, 32, 32, 3))
    f32 = fastvit_jax.create_model("t8", num_classes=10, lowering="native")
    bf16 = fastvit_jax.create_model("t8", num_classes=10, lowering="native", dtype=jnp.bfloat16)
    assert bf16.policy == ComputePolicy(jnp.bfloat16, "native", "none") and f32.policy.dtype == jnp.float32
    variables = jit_init(f32)(jax.random.PRNGKey(0), x)
    forward = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
    for m, dtype in ((f32, "f32"), (bf16, "bf16"), (f32, "f32")):
        convs = ops(forward.lower(m, variables, x).as_text(), "convolution")
        assert convs and all(s.endswith(f"x{dtype}>") for s in convs), (dtype, convs[:2])
    assert current_policy() == ComputePolicy()  # the model's policy ends with its trace

    conv = layers.Conv2d(4, 3, groups=4)
    conv_vars = conv.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
    with compute_policy(ComputePolicy(jnp.bfloat16, "native")):
        assert conv.apply(conv_vars, jnp.zeros((1, 8, 8, 4))).dtype == jnp.bfloat16
    assert conv.apply(conv_vars, jnp.zeros((1, 8, 8, 4))).dtype == jnp.float32
    with pytest.raises(ValueError, match="unknown conv lowering 'cudnn'; valid: native, shift"):
        fastvit_jax.create_model("t8", lowering="cudnn")
