"""Shared, cached builders for the parity tests (one build / one compile per variant and form)."""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest
import torch

import fastvit_jax
import torch_ref
from fastvit_jax.compare import relative_error
from torch_ref.testing import make_nontrivial

# The default run (make test) checks each per-variant feature on t8 (RepMixer blocks only) and sa12
# (RepMixer and attention); t12, s12, sa24, sa36 and ma36 run the same code at other depths and
# widths, in the slow tier (make test-slow), which CI runs too.
REPRESENTATIVE_VARIANTS = ("t8", "sa12")


def per_variant(variant: str, *values, id: str | None = None, group: bool = True):
    """A pytest parameter for one variant: in its own xdist group when ``group`` (one worker builds the
    variant's torch model for all its tests), and marked slow unless the variant is representative."""
    marks = [pytest.mark.xdist_group(variant)] if group else []
    if variant not in REPRESENTATIVE_VARIANTS:
        marks.append(pytest.mark.slow)
    return pytest.param(variant, *values, marks=marks, id=id)


# Bounded caches: one pytest worker runs the parity tests of many variants (mci3 alone holds
# ~0.5 GB per copy of its weights); the tests of one variant run together (xdist groups).
@functools.lru_cache(maxsize=2)
def torch_model(variant: str) -> torch.nn.Module:
    """A calibrated, non-trivial train-form torch_ref model (eval mode), one per variant."""
    torch.manual_seed(0)
    return make_nontrivial(torch_ref.create_model(variant), seed=1, image_size=128, batch=4)


@functools.lru_cache(maxsize=2)
def torch_fused(variant: str) -> torch.nn.Module:
    return torch_ref.reparameterize_model(torch_model(variant))


@functools.lru_cache(maxsize=4)
def jax_apply(variant: str, fused: bool, lowering: str | None = None):
    """jit(model.apply) in eval mode; compiled once per input shape."""
    model = fastvit_jax.create_model(variant, inference_mode=fused, lowering=lowering)
    return jax.jit(lambda variables, x: model.apply(variables, x, train=False))


def jit_init(model):
    """jax.jit(model.init), compiled as the trainer compiles its initialisation (a program that runs
    once: ``run_once_compiler_options``, about half the compile time on CPU)."""
    from fastvit_jax.training.state import run_once_compiler_options

    return jax.jit(model.init, compiler_options=run_once_compiler_options())


def images(shape, seed: int) -> np.ndarray:
    """ImageNet-normalized-like NCHW float32 input."""
    return np.random.RandomState(seed).randn(*shape).astype(np.float32)


def torch_logits(model: torch.nn.Module, x_nchw: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(x_nchw)).numpy()


def jax_logits(variant: str, fused: bool, variables, x_nchw: np.ndarray) -> np.ndarray:
    return np.asarray(jax_apply(variant, fused)(variables, x_nchw.transpose(0, 2, 3, 1)))


def torch_references(model: torch.nn.Module, fused: torch.nn.Module, shape, seed: int):
    """(input NCHW, unfused logits, fused logits) for a batch of ``shape``; asserts that the
    logits depend on the input (a near-constant model would make parity meaningless)."""
    x = images(shape, seed=seed)
    ref, ref_fused = torch_logits(model, x), torch_logits(fused, x)
    other = torch_logits(model, images(shape, seed=99))
    assert np.abs(ref - other).max() > 0.05 * np.abs(ref).max(), "logits must depend on the input"
    return x, ref, ref_fused


def assert_parity(out: np.ndarray, ref: np.ndarray, tol: float = 1e-5, what: str = "") -> float:
    """max |out - ref| / max |ref| <= tol and identical top-1; returns the error."""
    err = relative_error(out, ref)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.0e}"
    assert (out.argmax(-1) == ref.argmax(-1)).all(), f"{what}: top-1 differs"
    return err


def assert_tf_forward_parity(variant: str, fused: torch.nn.Module, fused_variables, size: int = 64) -> float:
    """The TensorFlow forward behind the TFLite export (``fastvit_jax.tf_forward``), run eagerly on
    ``fused_variables``, against the fused torch model: max |d| / max |logit| <= 1e-4, same top-1."""
    import tensorflow as tf

    from fastvit_jax.tf_forward import forward
    from fastvit_variants import get_variant

    x = images((3, 3, size, size), seed=5)
    ref = torch_logits(fused, x)
    got = forward(tf.constant(x.transpose(0, 2, 3, 1)), fused_variables, get_variant(variant)).numpy()
    return assert_parity(got, ref, tol=1e-4, what=f"{variant}@{size} tf_forward")


COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute")


def collectives_in(hlo_text: str) -> set:
    """The cross-device ops (sync or async-start form) in a compiled module's HLO text."""
    return {op for op in COLLECTIVES if f" {op}(" in hlo_text or f" {op}-start(" in hlo_text}
