"""The fused FastViT forward in TensorFlow ops, from a fused Flax variables tree (for TFLite).

Why a TensorFlow graph of its own: ``jax2tf`` in JAX 0.10 only serialises StableHLO inside a
``tf.XlaCallModule`` op, which the TFLite converter of TensorFlow 2.21 rejects ("neither a custom
op nor a flex op"), and the converters that go through PyTorch or ONNX (litert-torch, onnx2tf)
pin numpy 1.x / TensorFlow 2.19. The fused form is small: convolutions with bias, exact GELU,
the ConvFFN's eval BatchNorm, attention, SE and the head, written here block for block in the
order of ``fastvit_jax.model`` and checked against JAX for every variant (tests/test_export.py).

Layout: NHWC float32, normalised as the model's ``pretrained_cfg`` says; output (B, num_classes).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import tensorflow as tf

from fastvit_jax.fusion import BN_EPS, FUSED_CONV, is_fused
from fastvit_jax.layers import same_padding
from fastvit_variants import VariantConfig

Tree = Mapping[str, Any]


def _const(value: Any) -> tf.Tensor:
    return tf.constant(np.asarray(value, np.float32))


def conv(x: tf.Tensor, params: Tree, stride: int = 1) -> tf.Tensor:
    """torch-style conv (symmetric padding) with an HWIO kernel.

    Dense (groups 1) or depthwise (groups == input channels, output a multiple of them: torch's
    output channel g * m + j is TF's channel multiplier j of input g).
    """
    kernel = np.asarray(params["kernel"], np.float32)
    k, in_per_group, out = kernel.shape[0], kernel.shape[2], kernel.shape[3]
    pad = same_padding(k, stride)
    if pad:
        x = tf.pad(x, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    channels = x.shape[-1]
    if in_per_group == 1 and channels > 1 and out % channels == 0:
        multiplier = out // channels
        y = tf.nn.depthwise_conv2d(x, _const(kernel.reshape(k, k, channels, multiplier)), [1, stride, stride, 1],
                                   "VALID")
    elif in_per_group == channels:
        y = tf.nn.conv2d(x, _const(kernel), stride, "VALID")
    else:
        raise ValueError(f"grouped conv with {in_per_group} inputs per group of {channels} is not supported")
    return y + _const(params["bias"]) if "bias" in params else y


def batch_norm(x: tf.Tensor, params: Tree, stats: Tree) -> tf.Tensor:
    """Eval-mode BatchNorm as one multiply-add."""
    mul = np.asarray(params["scale"], np.float32) / np.sqrt(np.asarray(stats["var"], np.float32) + BN_EPS)
    return x * _const(mul) + _const(np.asarray(params["bias"]) - np.asarray(stats["mean"]) * mul)


def layer_norm(x: tf.Tensor, params: Tree) -> tf.Tensor:
    """LayerNorm over the channels (timm's LayerNorm2d, the MobileCLIP attention norm)."""
    mean = tf.reduce_mean(x, axis=-1, keepdims=True)
    var = tf.reduce_mean(tf.square(x - mean), axis=-1, keepdims=True)
    return (x - mean) * tf.math.rsqrt(var + BN_EPS) * _const(params["scale"]) + _const(params["bias"])


def gelu(x: tf.Tensor) -> tf.Tensor:
    return tf.nn.gelu(x, approximate=False)


def squeeze_excite(x: tf.Tensor, params: Tree) -> tf.Tensor:
    s = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    s = tf.nn.relu(conv(s, params["fc1"]))
    return x * tf.sigmoid(conv(s, params["fc2"]))


def mobileone(x: tf.Tensor, params: Tree, stride: int = 1, act: bool = True, se: bool = False) -> tf.Tensor:
    """A fused MobileOne block (or large-kernel conv): conv, [squeeze-excite], [GELU]."""
    y = conv(x, params[FUSED_CONV], stride)
    if se:
        y = squeeze_excite(y, params["se"])
    return gelu(y) if act else y


def conv_mlp(x: tf.Tensor, params: Tree, stats: Tree) -> tf.Tensor:
    y = batch_norm(conv(x, params["conv"]["conv"]), params["conv"]["bn"], stats["conv"]["bn"])
    return conv(gelu(conv(y, params["fc1"])), params["fc2"])


def attention(x: tf.Tensor, params: Tree, head_dim: int) -> tf.Tensor:
    height, width, channels = x.shape[1], x.shape[2], x.shape[3]
    heads = channels // head_dim
    tokens = tf.reshape(x, [-1, height * width, channels])
    qkv = tf.matmul(tokens, _const(params["qkv"]["kernel"]))
    qkv = tf.transpose(tf.reshape(qkv, [-1, height * width, 3, heads, head_dim]), [2, 0, 3, 1, 4])
    q, k, v = qkv[0] * head_dim ** -0.5, qkv[1], qkv[2]  # (B, heads, N, head_dim)
    attn = tf.nn.softmax(tf.matmul(q, k, transpose_b=True), axis=-1)
    out = tf.reshape(tf.transpose(tf.matmul(attn, v), [0, 2, 1, 3]), [-1, height * width, channels])
    out = tf.matmul(out, _const(params["proj"]["kernel"])) + _const(params["proj"]["bias"])
    return tf.reshape(out, [-1, height, width, channels])


def repmixer_block(x: tf.Tensor, params: Tree, stats: Tree) -> tf.Tensor:
    x = conv(x, params["token_mixer"][FUSED_CONV])
    return x + conv_mlp(x, params["mlp"], stats["mlp"]) * _const(params["layer_scale"]["gamma"])


def attention_block(x: tf.Tensor, params: Tree, stats: Tree, head_dim: int, norm_kind: str) -> tf.Tensor:
    norm = batch_norm(x, params["norm"], stats["norm"]) if norm_kind == "batchnorm" else layer_norm(x, params["norm"])
    y = attention(norm, params["token_mixer"], head_dim)
    x = x + y * _const(params["layer_scale_1"]["gamma"])
    return x + conv_mlp(x, params["mlp"], stats["mlp"]) * _const(params["layer_scale_2"]["gamma"])


def forward(x: tf.Tensor, variables: Tree, cfg: VariantConfig) -> tf.Tensor:
    """(B, H, W, 3) -> (B, num_classes) logits (pooled features when the head has no ``fc``).

    The structure is the variant's plan (``cfg.stem_plan()``, ``stage_plans()``, ``final_conv_plan()``),
    the one the Flax model and torch_ref are built from; the variables only provide the weights.
    """
    params, stats = variables["params"], variables.get("batch_stats", {})
    if not is_fused(params["stem_0"]):
        raise ValueError("tf_forward needs fused variables: run fastvit_jax.reparameterize first")
    for i, b in enumerate(cfg.stem_plan()):
        x = mobileone(x, params[f"stem_{i}"], b.stride, se=b.se)
    for st in cfg.stage_plans():
        stage, stage_stats = params[f"stages_{st.index}"], stats.get(f"stages_{st.index}", {})
        if st.downsample:  # large-kernel conv (+ SE and GELU in the MobileCLIP towers), 1x1 MobileOne
            x = mobileone(x, stage["downsample"]["proj_0"], 2, act=cfg.lkc_use_act, se=st.se_downsample)
            x = mobileone(x, stage["downsample"]["proj_1"])
        if st.pos_emb:
            x = conv(x, stage["pos_emb"][FUSED_CONV])
        for b in range(st.depth):
            block, block_stats = stage[f"blocks_{b}"], stage_stats.get(f"blocks_{b}", {})
            if st.token_mixer == "attention":
                x = attention_block(x, block, block_stats, cfg.head_dim, cfg.attention_norm)
            else:
                x = repmixer_block(x, block, block_stats)
    fc_plan = cfg.final_conv_plan()
    x = tf.reduce_mean(mobileone(x, params["final_conv"], fc_plan.stride, se=fc_plan.se), axis=[1, 2])
    fc = params.get("head", {}).get("fc")
    return tf.matmul(x, _const(fc["kernel"])) + _const(fc["bias"]) if fc else x
