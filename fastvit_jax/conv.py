"""2-D convolution on NHWC arrays with a lowering chosen per backend.

XLA's CPU backend runs grouped / depthwise convolutions through a slow generic path
(7x7 depthwise on 8x64x64x48: 137 ms, against 4.3 ms in PyTorch). The same op written
as k*k shifted multiply-adds, which XLA fuses into one loop, takes ~5 ms. On GPU/TPU
the native convolution is the fast one. ``conv2d`` picks per backend; both lowerings
compute the same function and are tested against each other. Design and measurements:
docs/performance.md#conv-lowering-per-backend.

Kernels are HWIO: (kh, kw, in_channels // groups, out_channels), like ``flax.linen.Conv``.
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

LOWERINGS = ("native", "shift")


def default_lowering() -> str:
    """'shift' on CPU (XLA's CPU grouped conv is ~30x slower than fused multiply-adds), else 'native'."""
    return "shift" if jax.default_backend() == "cpu" else "native"


def resolve_lowering(lowering: Optional[str]) -> str:
    """``lowering``, or the backend's default when None; ValueError for an unknown name."""
    return _check_lowering(lowering or default_lowering())


def _check_lowering(lowering: str) -> str:
    if lowering not in LOWERINGS:
        raise ValueError(f"unknown conv lowering {lowering!r}; valid: {', '.join(LOWERINGS)}")
    return lowering


def conv2d_native(x: jax.Array, kernel: jax.Array, stride: int, padding: int, groups: int) -> jax.Array:
    """``lax.conv_general_dilated`` with explicit symmetric padding (never 'SAME'), in x's dtype.

    Operands and result stay in the compute dtype (bfloat16 convs are bfloat16 in and out, with
    float32 accumulation inside the kernel, as cuDNN and the TPU do). Asking for a float32 result
    instead makes XLA:GPU run the whole conv, forward and backward, in float32.
    """
    return lax.conv_general_dilated(
        x, kernel.astype(x.dtype), (stride, stride), ((padding, padding), (padding, padding)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)


def _windows(xp: jax.Array, kh: int, kw: int, stride: int, out_h: int, out_w: int) -> list:
    """The kh*kw strided windows of a padded (B, Hp, Wp, C) input, each (B, out_h, out_w, C), row-major."""
    b, _, _, c = xp.shape
    return [lax.slice(xp, (0, i, j, 0), (b, i + stride * (out_h - 1) + 1, j + stride * (out_w - 1) + 1, c),
                      (1, stride, stride, 1))
            for i in range(kh) for j in range(kw)]


def _shifted_sum(xp: jax.Array, weights: jax.Array, stride: int, out_h: int, out_w: int) -> jax.Array:
    """sum over taps of strided windows of a padded input times per-channel weights.

    xp: (B, Hp, Wp, C) already padded; weights: (kh, kw, C, m). Returns (B, out_h, out_w, C * m)
    in float32 with channel o = c * m + q. Each multiplier index q is its own sum over C
    contiguous channels; the input is never repeated (a repeat makes XLA recompute a fused
    producer once per copy).
    """
    kh, kw, c, multiplier = weights.shape
    b = xp.shape[0]
    taps = [t.astype(jnp.float32) for t in _windows(xp, kh, kw, stride, out_h, out_w)]
    flat = weights.reshape(kh * kw, c, multiplier).astype(jnp.float32)
    outs = []
    for q in range(multiplier):
        out = taps[0] * flat[0, :, q]
        for t in range(1, len(taps)):
            out = out + taps[t] * flat[t, :, q]
        outs.append(out)
    return outs[0] if multiplier == 1 else jnp.stack(outs, axis=-1).reshape(b, out_h, out_w, c * multiplier)


def _folded_products(taps, g: jax.Array, max_folds: int = 8) -> jax.Array:
    """Per tap, the product tap * g with groups of `folds` adjacent rows added: (T, B, H/folds, W, C).

    XLA:CPU runs one reduction over a (B, H, W, C) product per tap at memory speed, kh*kw
    passes in all; adding adjacent rows elementwise first (one fused, vectorised loop) leaves a
    reduction `folds` times smaller (measured 3.5-4x faster for the kernel gradient). Rows are
    folded within each image, so a batch sharded over devices stays local.
    """
    b, h, w, c = g.shape
    folds = max(f for f in range(1, max_folds + 1) if h % f == 0)
    g = g.reshape(b, h // folds, folds, w, c)
    parts = []
    for tap in taps:
        tap = tap.reshape(b, h // folds, folds, w, c)
        acc = tap[:, :, 0] * g[:, :, 0]
        for f in range(1, folds):
            acc = acc + tap[:, :, f] * g[:, :, f]
        parts.append(acc)
    return jnp.stack(parts)


def _kernel_gradient(xp: jax.Array, g: jax.Array, kh: int, kw: int, stride: int) -> jax.Array:
    """Gradient of a one-channel-per-group kernel: per tap (i, j), the sum over (B, H, W) of the
    strided window of the padded input xp (B, Hp, Wp, C) times g (B, H, W, C). Returns (kh*kw, C).

    One loop over the kh kernel rows (``lax.map``), the kw taps of a row unrolled in its body: XLA
    compiles one row instead of kh*kw folded reductions (t8's training step on CPU: 50 -> 15 s of
    compile) and runs it faster (each row reads one slab of rows of xp); the sums are the same,
    bit for bit.
    """
    b, out_h, out_w, c = g.shape
    span_h = stride * (out_h - 1) + 1

    def one_row(i):
        rows = lax.dynamic_slice_in_dim(xp, i, span_h, axis=1)
        return jnp.sum(_folded_products(_windows(rows, 1, kw, stride, out_h, out_w), g), axis=(1, 2, 3))

    return lax.map(one_row, jnp.arange(kh)).reshape(kh * kw, c)


def _out_size(size: int, k: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - k) // stride + 1


def _pad_hw(x: jax.Array, padding: int) -> jax.Array:
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_shift(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A conv with one input channel per group (depthwise, or depthwise with a channel
    multiplier) as a sum of kh*kw shifted, strided multiply-adds.

    x: (B, H, W, C); kernel: (kh, kw, 1, C * m). Output channel o reads input channel o // m,
    which is PyTorch's grouping for groups == C. Accumulates in float32 (bfloat16 inputs
    would otherwise round after each of the k*k adds).

    The gradient is hand-written (``_conv2d_shift_bwd``): autodiff of the slices makes XLA
    keep every tap (kh*kw copies of the input) for the backward pass.
    """
    kh, kw, _, out_ch = kernel.shape
    b, h, w, c = x.shape
    weights = kernel.reshape(kh, kw, c, out_ch // c)
    out = _shifted_sum(_pad_hw(x, padding), weights, stride, _out_size(h, kh, stride, padding),
                       _out_size(w, kw, stride, padding))
    return out.astype(x.dtype)


def _conv2d_shift_fwd(x, kernel, stride, padding):
    return conv2d_shift(x, kernel, stride, padding), (x, kernel)


def _conv2d_shift_bwd(stride, padding, residuals, g):
    """dx: the stride-dilated output gradient correlated with the flipped kernel (itself a
    shifted sum); dkernel: per tap, sum over (B, H, W) of window * gradient."""
    x, kernel = residuals
    kh, kw, _, out_ch = kernel.shape
    b, h, w, c = x.shape
    multiplier = out_ch // c
    out_h, out_w = g.shape[1:3]
    g = g.astype(jnp.float32).reshape(b, out_h, out_w, c, multiplier)
    flipped = kernel[::-1, ::-1, 0].reshape(kh, kw, c, multiplier)
    pad_cfg = ((0, 0, 0), (kh - 1 - padding, h + padding - stride * (out_h - 1) - 1, stride - 1),
               (kw - 1 - padding, w + padding - stride * (out_w - 1) - 1, stride - 1), (0, 0, 0))
    dx = None
    for q in range(multiplier):
        gq = lax.pad(g[..., q], jnp.float32(0), pad_cfg)
        term = _shifted_sum(gq, flipped[..., q:q + 1], 1, h, w)
        dx = term if dx is None else dx + term
    xp = _pad_hw(x, padding).astype(jnp.float32)
    dk = jnp.stack([_kernel_gradient(xp, g[..., q], kh, kw, stride) for q in range(multiplier)], axis=-1)
    dkernel = dk.reshape(kh, kw, 1, out_ch)  # (kh*kw, C, multiplier) -> HWIO, channel c * m + q
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv2d_shift.defvjp(_conv2d_shift_fwd, _conv2d_shift_bwd)


def _as_rows(a: jax.Array) -> jax.Array:
    """(B, H, W, C) -> (B*H*W, C) in float32."""
    return a.reshape(-1, a.shape[-1]).astype(jnp.float32)


def _undo_stride(d: jax.Array, shape, stride: int) -> jax.Array:
    """Gradient of ``x[:, ::stride, ::stride, :]`` : scatter d back into zeros of ``shape``."""
    if stride == 1:
        return d
    _, h, w, _ = shape
    return lax.pad(d, jnp.zeros((), d.dtype), ((0, 0, 0), (0, h - 1 - (d.shape[1] - 1) * stride, stride - 1),
                                               (0, w - 1 - (d.shape[2] - 1) * stride, stride - 1), (0, 0, 0)))


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def conv2d_pointwise(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """A dense 1x1 conv as a matmul over channels.

    The gradient is hand-written as two plain (rows, C) matmuls: XLA:CPU sends autodiff's
    4-D contraction for the kernel gradient to a slow generic dot (7 ms instead of 0.7 ms for
    the stem's 3->48 conv at batch 8).
    """
    if stride > 1:
        x = x[:, ::stride, ::stride, :]
    return jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0], preferred_element_type=jnp.float32).astype(x.dtype)


def _conv2d_pointwise_fwd(x, kernel, stride):
    return conv2d_pointwise(x, kernel, stride), (x, kernel)


def _conv2d_pointwise_bwd(stride, residuals, g):
    x, kernel = residuals
    xs = x[:, ::stride, ::stride, :] if stride > 1 else x
    g_rows = _as_rows(g)
    dkernel = jnp.dot(_as_rows(xs).T, g_rows)[None, None]
    dxs = jnp.dot(g_rows, kernel[0, 0].astype(jnp.float32).T).reshape(xs.shape)
    return _undo_stride(dxs, x.shape, stride).astype(x.dtype), dkernel.astype(kernel.dtype)


conv2d_pointwise.defvjp(_conv2d_pointwise_fwd, _conv2d_pointwise_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_dense_small(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A dense k x k conv with few input channels (FastViT's stem: 3x3, 3 -> C, stride 2).

    Forward and input gradient are XLA's native conv; the kernel gradient is an im2col matmul
    ((kh*kw*C_in, rows) @ (rows, C_out)), 6x faster on CPU than the native conv's kernel
    gradient (1.9 vs 11.5 ms for the stem at batch 8, 256 px).
    """
    return conv2d_native(x, kernel, stride, padding, 1)


def _conv2d_dense_small_fwd(x, kernel, stride, padding):
    return conv2d_dense_small(x, kernel, stride, padding), (x, kernel)


def _conv2d_dense_small_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    kh, kw, cin, cout = kernel.shape
    _, dx_fn = jax.vjp(lambda a: conv2d_native(a, kernel, stride, padding, 1), x)
    (dx,) = dx_fn(g)
    _, out_h, out_w, _ = g.shape
    patches = jnp.concatenate(_windows(_pad_hw(x, padding), kh, kw, stride, out_h, out_w), axis=-1)  # kh*kw*cin
    dkernel = jnp.dot(_as_rows(patches).T, _as_rows(g)).reshape(kh, kw, cin, cout)
    return dx, dkernel.astype(kernel.dtype)


conv2d_dense_small.defvjp(_conv2d_dense_small_fwd, _conv2d_dense_small_bwd)


def _depthwise_per_multiplier(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A depthwise conv with channel multiplier m written as m plain depthwise convs (one output
    channel per input channel each), their outputs interleaved back to channel o = c * m + q."""
    c, out_ch = x.shape[-1], kernel.shape[-1]
    m = out_ch // c
    outs = [conv2d_native(x, kernel[..., q::m], stride, padding, c) for q in range(m)]
    y = jnp.stack(outs, axis=-1)
    return y.reshape(*y.shape[:-2], out_ch)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_depthwise_multiplier(x: jax.Array, kernel: jax.Array, stride: int, padding: int) -> jax.Array:
    """A depthwise conv with a channel multiplier (FastViT's downsampling 7x7 / 3x3 convs, C -> 2C,
    stride 2), as one native conv; its gradient is that of m plain depthwise convs.

    x: (B, H, W, C); kernel: (kh, kw, 1, C * m), output channel o reads input channel o // m.
    Autodiff's input gradient of the single conv is a grouped conv with m input channels per group,
    which the TPU compiler runs with the batch as the minor dimension, behind relayouts of the
    full-resolution input: in ma36's training step (v5e, 256 px) its six downsampling convs took 23%
    of the compiler's estimated cycles, 86% of that in the backward. Written as m plain depthwise
    convs, the backward uses the same kernels as every other depthwise conv, and those six convs
    take 4% (docs/performance.md#channel-multiplier-convs-on-tpu).
    """
    return conv2d_native(x, kernel, stride, padding, x.shape[-1])


def _conv2d_depthwise_multiplier_fwd(x, kernel, stride, padding):
    return conv2d_depthwise_multiplier(x, kernel, stride, padding), (x, kernel)


def _conv2d_depthwise_multiplier_bwd(stride, padding, residuals, g):
    x, kernel = residuals
    _, vjp = jax.vjp(lambda a, k: _depthwise_per_multiplier(a, k, stride, padding), x, kernel)
    return vjp(g)


conv2d_depthwise_multiplier.defvjp(_conv2d_depthwise_multiplier_fwd, _conv2d_depthwise_multiplier_bwd)


# im2col rows for the kernel gradient stay small up to this many kh*kw*C_in columns
DENSE_SMALL_MAX_COLUMNS = 64


def materialize(x: jax.Array) -> jax.Array:
    """``x`` unchanged, but computed once and written out whole: XLA cannot fuse its producer
    into its consumers.

    Why: with the 'shift' lowering a FastViT block is elementwise work between matmuls, and
    XLA:CPU fuses cheap elementwise producers into every consumer. In a fused RepMixer stage
    (``x = dwconv3x3(x) + ls * mlp(x)``) the 3x3 conv's centre tap ``slice(pad(x))`` simplifies
    to ``x``, so without a barrier every later block recomputes the residual stream from the
    stage input inside its own fusion: sa12's six ``stages_2`` blocks then take 6.3 to 11.6 ms,
    growing along the stage, and fused sa12 runs slower than its unfused form.
    ``lax.optimization_barrier`` alone does not stop this (XLA:CPU drops it before fusion); a
    conditional does, since fusion never crosses its boundary
    (docs/performance.md#fusion-barriers-at-block-inputs).

    The predicate is ``isnan`` of a constant hidden behind an optimization barrier: never true,
    but not folded before the conditional simplifier runs, and replicated, so a batch-sharded
    ``x`` needs no collective. Both branches return ``x``; they are written differently because
    a conditional with identical branches is removed at once. ``tests/test_fastvit_jax.py``
    checks that the compiled models keep one conditional per block (and between the stem blocks):
    if a new XLA folds them, that test fails (the result stays correct; only the speed would go).
    """
    pred = jnp.isnan(lax.optimization_barrier(jnp.zeros((), jnp.float32)))
    return lax.cond(pred, lambda a: a * 1, lambda a: a, x)


def needs_materialized_input(lowering: Optional[str] = None) -> bool:
    """True where ``materialize`` pays: the 'shift' lowering on the CPU backend (on GPU a
    conditional would cost a device-to-host sync of its predicate; native convs read ``x`` once)."""
    return (lowering or default_lowering()) == "shift" and jax.default_backend() == "cpu"


# The lowered convs, each one compiled program when called outside jit: eagerly (``model.init`` or
# ``model.apply`` without ``jax.jit``) a 7x7 shifted sum would otherwise dispatch, and compile,
# 49 slices, multiplies and adds one by one (t8's eager init: ~400 tiny compiles, ~15 s on CPU).
# Under jit they are inlined into the caller's program.
_conv2d_shift_jit = jax.jit(conv2d_shift, static_argnums=(2, 3))
_conv2d_pointwise_jit = jax.jit(conv2d_pointwise, static_argnums=(2,))
_conv2d_dense_small_jit = jax.jit(conv2d_dense_small, static_argnums=(2, 3))


def conv2d(x: jax.Array, kernel: jax.Array, *, stride: int = 1, padding: int = 0, groups: int = 1,
           lowering: Optional[str] = None) -> jax.Array:
    """NHWC convolution, HWIO kernel, symmetric zero padding, PyTorch grouping.

    ``lowering``: None picks per backend (``default_lowering``); 'native' always uses
    ``lax.conv_general_dilated`` (a depthwise conv with a channel multiplier with its gradient
    written as plain depthwise convs: ``conv2d_depthwise_multiplier``); 'shift' uses multiply-adds
    for one-input-channel-per-group convs and a matmul for dense 1x1 convs (other convs stay native).
    """
    lowering = resolve_lowering(lowering)
    kh, kw, in_per_group, _ = kernel.shape
    if lowering == "shift":
        if in_per_group == 1 and groups == x.shape[-1] and groups > 1:
            return _conv2d_shift_jit(x, kernel, stride, padding)
        if groups == 1 and kh == kw == 1 and padding == 0:
            return _conv2d_pointwise_jit(x, kernel, stride)
        if groups == 1 and kh * kw * in_per_group <= DENSE_SMALL_MAX_COLUMNS:
            return _conv2d_dense_small_jit(x, kernel, stride, padding)
    if in_per_group == 1 and groups == x.shape[-1] and kernel.shape[-1] > groups:
        return conv2d_depthwise_multiplier(x, kernel, stride, padding)
    return conv2d_native(x, kernel, stride, padding, groups)
