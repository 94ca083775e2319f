"""The MobileCLIP image towers mci0 ... mci4 (timm ``fastvit_mci*``) in both frameworks.

- parameter counts, train form equal to timm's and fused form equal to what both
  reparameterizations produce, for all five variants (abstract shapes: nothing allocated);
- logit parity torch_ref vs Flax on every conversion path (timm layout unfused / fused,
  fused on the JAX side, Apple layout unfused / fused), fused vs unfused in each framework,
  max |d| / max |logit| <= 1e-5 with non-trivial weights. The default suite runs mci0 (256 px
  and 64x96) and the five-stage mci3 at 128x192; 256 px for mci3 and the other three variants
  are marked slow;
- full CLIP checkpoints: open_clip's ``visual.trunk.`` layout and Apple MobileCLIP's
  ``image_encoder.model.`` layout give the same Flax variables as the bare timm layout, the
  text tower is left out with a warning, and the projected, normalised image embedding
  equals the torch side's.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fastvit_jax
import torch_ref
from convert.core import convert_state_dict, variables_to_state_dict
from fastvit_variants import (
    MOBILECLIP_GMACS,
    MOBILECLIP_VARIANTS,
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    TIMM_MOBILECLIP_PARAM_COUNTS,
    VARIANTS,
    get_variant,
)
from fastvit_jax.weights.layouts import timm_to_apple
from fastvit_jax.weights.state_dict import count_params
from helpers import (
    assert_parity,
    assert_tf_forward_parity,
    images,
    jax_logits,
    torch_fused,
    torch_logits,
    torch_model,
    torch_references,
)

TRAIN_PARAM_COUNTS = {v: counts[0] for v, counts in TIMM_MOBILECLIP_PARAM_COUNTS.items()}
FUSED_PARAM_COUNTS = {v: counts[1] for v, counts in TIMM_MOBILECLIP_PARAM_COUNTS.items()}


def _torch_count(variant: str, inference_mode: bool, num_classes: int = 1000) -> int:
    with torch.device("meta"):
        model = torch_ref.create_model(variant, num_classes=num_classes, inference_mode=inference_mode)
    return sum(p.numel() for p in model.parameters())


def _flax_count(variant: str, inference_mode: bool, num_classes: int = 1000) -> int:
    model = fastvit_jax.create_model(variant, num_classes=num_classes, inference_mode=inference_mode)
    size = get_variant(variant).reduction
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3))))
    return count_params(abstract["params"])


@pytest.mark.parametrize("variant", MOBILECLIP_VARIANTS)
def test_param_counts_equal_timm(variant):
    train, fused = TRAIN_PARAM_COUNTS[variant], FUSED_PARAM_COUNTS[variant]
    assert (_torch_count(variant, False), _torch_count(variant, True)) == (train, fused)
    assert (_flax_count(variant, False), _flax_count(variant, True)) == (train, fused)


@pytest.mark.parametrize("variant", ["mci0", "mci3"])
def test_gmacs_table_is_the_conv_and_matmul_count(variant):
    """MOBILECLIP_GMACS: conv + matmul multiply-accumulates at 256 px, counted as for the base variants."""
    from benchmarks.flops import jaxpr_macs

    x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
    for i, fused in enumerate((False, True)):
        model = fastvit_jax.create_model(variant, num_classes=1000, inference_mode=fused, lowering="native")
        shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))
        macs = jaxpr_macs(lambda v, xx: model.apply(v, xx, train=False), shapes, x)
        assert round(macs / 1e9, 3) == MOBILECLIP_GMACS[variant][i]


def test_variant_tables():
    assert set(MOBILECLIP_VARIANTS).isdisjoint(VARIANTS) and len(fastvit_jax.ALL_VARIANTS) == 12
    assert get_variant("fastvit_mci3").reduction == 64 and get_variant("mci0").reduction == 32
    assert get_variant("mci3").stage_downsamples() == (False, True, True, True, True)
    with pytest.raises(ValueError, match="mci4"):
        get_variant("mci5")


@pytest.mark.parametrize("variant,classes,mean,std", [
    ("mci0", 512, (0.0,) * 3, (1.0,) * 3), ("mci2", 512, (0.0,) * 3, (1.0,) * 3),
    ("mci3", 768, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD), ("mci4", 768, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
def test_pretrained_cfg_and_default_head(variant, classes, mean, std):
    cfg = fastvit_jax.pretrained_cfg(variant)
    assert (cfg.num_classes, cfg.mean, cfg.std) == (classes, mean, std)
    assert (cfg.crop_pct, cfg.interpolation, cfg.input_size) == (1.0, "bilinear", (3, 256, 256))  # Apple/open_clip
    model = fastvit_jax.create_model(variant)
    assert model.num_classes == classes and model.pretrained_cfg == cfg
    with torch.device("meta"):
        assert torch_ref.create_model(variant, inference_mode=True).head.fc.out_features == classes
    assert fastvit_jax.pretrained_cfg("sa12").num_classes == 1000  # the base variants keep ImageNet's head


def test_mobileclip_switches_are_in_the_graph():
    """SE only in the stage 3-4 downsamples of mci0-2; LayerNorm2d and no stem scale branch in mci3/mci4."""
    small = torch_ref.create_model("mci0", inference_mode=True).state_dict()
    assert "stages.2.downsample.proj.0.se.fc1.weight" in small and "stages.3.downsample.proj.0.se.fc1.weight" in small
    assert small["stages.3.downsample.proj.0.se.fc1.weight"].shape == (128, 512, 1, 1)  # rd ratio 1/4
    assert "stages.1.downsample.proj.0.se.fc1.weight" not in small
    with torch.device("meta"):
        large = torch_ref.create_model("mci3").state_dict()
    assert "stem.0.conv_scale.conv.weight" not in large and "stem.0.conv_kxk.0.conv.weight" in large
    assert "stages.0.downsample.proj.0.large_conv.conv.weight" not in large
    assert "stages.4.pos_emb.pos_enc.weight" in large and "stages.4.blocks.0.norm.running_mean" not in large
    assert large["stages.4.blocks.0.norm.weight"].shape == (1536,)
    assert not any(".se." in k for k in large if k.startswith("stages."))


# --------------------------------------------------------------------------- parity
SMALL_SIZES = [(256, 256), (64, 96)]
LARGE_SIZES = [(256, 256), (128, 192)]
PARITY_CASES = [
    pytest.param("mci0", SMALL_SIZES, marks=pytest.mark.xdist_group("mci0")),
    pytest.param("mci3", LARGE_SIZES[1:], marks=pytest.mark.xdist_group("mci3")),
    pytest.param("mci3", LARGE_SIZES[:1], marks=[pytest.mark.slow, pytest.mark.xdist_group("mci3")]),
    pytest.param("mci1", SMALL_SIZES[1:], marks=pytest.mark.xdist_group("mci1")),
    pytest.param("mci1", SMALL_SIZES[:1], marks=[pytest.mark.slow, pytest.mark.xdist_group("mci1")]),
    pytest.param("mci2", SMALL_SIZES[1:], marks=pytest.mark.xdist_group("mci2")),
    pytest.param("mci2", SMALL_SIZES[:1], marks=[pytest.mark.slow, pytest.mark.xdist_group("mci2")]),
    pytest.param("mci4", LARGE_SIZES, marks=[pytest.mark.slow, pytest.mark.xdist_group("mci4")]),
]


@functools.lru_cache(maxsize=1)
def _conversions(variant: str):
    """Every conversion path of the torch_ref model's state_dicts (one set per variant)."""
    sd, fused_sd = torch_model(variant).state_dict(), torch_fused(variant).state_dict()
    cfg = get_variant(variant)
    return {
        "timm unfused": (convert_state_dict(sd), False),
        "timm unfused -> jax-fused": (convert_state_dict(sd, fused=True), True),
        "timm fused": (convert_state_dict(fused_sd), True),
        "apple unfused": (convert_state_dict(timm_to_apple(sd, cfg), variant=variant), False),
        "apple fused": (convert_state_dict(timm_to_apple(fused_sd, cfg)), True),
    }


@pytest.mark.parametrize("variant,sizes", PARITY_CASES)
def test_parity_all_paths(variant, sizes):
    model, fused = torch_model(variant), torch_fused(variant)
    conversions = _conversions(variant)
    classes = get_variant(variant).num_classes
    for name, (result, is_fused) in conversions.items():
        assert (result.variant, result.form, result.layout) == (
            variant, "fused" if is_fused else "train", name.split()[0])
        count = FUSED_PARAM_COUNTS[variant] if is_fused else TRAIN_PARAM_COUNTS[variant]
        feats = get_variant(variant).num_features
        assert result.num_params == count - (1000 - classes) * (feats + 1)
    for i, (h, w) in enumerate(sizes):
        x, ref, ref_fused = torch_references(model, fused, (2, 3, h, w), seed=10 + i)
        where = f"{variant}@{h}x{w}"
        assert_parity(ref_fused, ref, what=f"{where} torch fused vs unfused")
        outs = {name: jax_logits(variant, is_fused, result.variables, x)
                for name, (result, is_fused) in conversions.items()}
        for name, out in outs.items():
            assert_parity(out, ref, what=f"{where} {name}")
        assert_parity(outs["timm unfused -> jax-fused"], outs["timm unfused"], what=f"{where} jax fused vs unfused")
    # The TFLite export's TensorFlow forward: LayerNorm, squeeze-excite and the fifth stage (mci3/mci4).
    assert_tf_forward_parity(variant, fused, conversions["timm fused"][0].variables)


@pytest.mark.parametrize("variant", [pytest.param("mci0", marks=pytest.mark.xdist_group("mci0")),
                                     pytest.param("mci3", marks=[pytest.mark.slow, pytest.mark.xdist_group("mci3")])])
def test_flax_to_torch_writes_timm_layout_back(variant):
    """Flax -> timm-layout state_dict: loads strictly into torch_ref (both forms), converts back exactly."""
    for name in ("timm unfused", "timm unfused -> jax-fused"):
        result, is_fused = _conversions(variant)[name]
        sd, back_variant, form = variables_to_state_dict(result.variables)
        assert (back_variant, form) == (variant, "fused" if is_fused else "train")
        rebuilt = torch_ref.create_model(variant, inference_mode=is_fused)
        rebuilt.load_state_dict(sd, strict=True)
        again = convert_state_dict(sd)
        for path, leaf in jax.tree_util.tree_leaves_with_path(result.variables):
            np.testing.assert_array_equal(np.asarray(leaf), _get(again.variables, path), err_msg=str(path))


def _get(tree, path):
    for entry in path:
        tree = tree[entry.key]
    return np.asarray(tree)


# --------------------------------------------------------------------------- CLIP checkpoints
TEXT_TOWER = {"logit_scale": np.ones(()), "text.token_embedding.weight": np.zeros((8, 4), np.float32),
              "text.transformer.resblocks.0.ln_1.weight": np.ones((4,), np.float32)}


def _tower_sd(variant: str):
    return {k: v.numpy() for k, v in torch_model(variant).state_dict().items()}


def _assert_same_variables(a, b):
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    for (path, x), (_, y) in zip(flat_a, flat_b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(path))


def _open_clip(sd):
    """open_clip's MobileCLIP layout: the trunk (whose classifier is the projection) next to the text tower."""
    return {**{f"visual.trunk.{k}": v for k, v in sd.items()}, **TEXT_TOWER}


def _open_clip_separate_proj(sd):
    """open_clip with a separate linear projection: trunk without classifier + ``visual.head.proj.weight``."""
    out = {f"visual.trunk.{k}": v for k, v in sd.items() if not k.startswith("head.fc.")}
    out["visual.head.proj.weight"] = sd["head.fc.weight"]
    return {**out, **TEXT_TOWER}


def _mobileclip(sd, variant):
    """Apple's MobileCLIP layout: Apple's FastViT keys under ``image_encoder.model.``, ``head.proj`` (F, E)."""
    apple = timm_to_apple({k: v for k, v in sd.items() if not k.startswith("head.fc.")}, get_variant(variant))
    out = {f"image_encoder.model.{k}": v for k, v in apple.items()}
    out["image_encoder.model.head.proj"] = np.ascontiguousarray(sd["head.fc.weight"].T)
    out["text_encoder.transformer.layers.0.weight"] = np.zeros((4, 4), np.float32)
    out["logit_scale"] = np.ones(())
    return out


@pytest.mark.parametrize("variant", [pytest.param("mci0", marks=pytest.mark.xdist_group("mci0")),
                                     pytest.param("mci3", marks=[pytest.mark.slow, pytest.mark.xdist_group("mci3")])])
def test_clip_checkpoint_layouts_give_the_timm_variables(variant):
    sd = _tower_sd(variant)
    sd["head.fc.bias"] = np.zeros_like(sd["head.fc.bias"])  # a CLIP projection has no bias
    reference = convert_state_dict(sd)
    as_torch = {k: torch.as_tensor(v) for k, v in _mobileclip(sd, variant).items()}  # as torch.load gives it
    for layout, clip_sd in (("open_clip", _open_clip(sd)), ("open_clip", _open_clip_separate_proj(sd)),
                            ("mobileclip", _mobileclip(sd, variant)), ("mobileclip", as_torch)):
        with pytest.warns(UserWarning, match=f"{layout} checkpoint: took the image tower, left out"):
            result = convert_state_dict(clip_sd)
        assert (result.layout, result.variant, result.form) == (layout, variant, "train")
        _assert_same_variables(result.variables, reference.variables)


def test_clip_checkpoint_errors_name_the_keys():
    sd = _open_clip(_tower_sd("mci0"))
    sd["visual.head.proj.weight"] = sd["visual.trunk.head.fc.weight"]
    with pytest.raises(ValueError, match="both visual.trunk.head.fc.weight and visual.head.proj.weight"):
        convert_state_dict(sd)
    sd = _open_clip(_tower_sd("mci0"))
    sd["visual.attnpool.positional_embedding"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match="visual.attnpool.positional_embedding"):
        convert_state_dict(sd)


@pytest.mark.xdist_group("mci0")
def test_image_embedding_matches_torch():
    """Apple's MobileCLIP tower: pooled features @ head.proj, L2-normalised; JAX forward_head(pre_logits) -> proj."""
    variant = "mci0"
    model = torch_model(variant)
    sd = _tower_sd(variant)
    proj = np.ascontiguousarray(sd["head.fc.weight"].T)  # (F, E), as Apple stores it
    with pytest.warns(UserWarning):
        result = convert_state_dict(_mobileclip(sd, variant), fused=True)
    x = images((2, 3, 64, 64), seed=3)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(torch.from_numpy(x)), pre_logits=True).numpy()
    ref = pooled.astype(np.float64) @ proj
    ref /= np.linalg.norm(ref, axis=-1, keepdims=True)

    jmodel = fastvit_jax.create_model(variant, inference_mode=True)

    @jax.jit
    def embed(variables, images_nhwc):
        def f(m, xx):
            return m.forward_head(m.forward_features(xx), pre_logits=True)
        pre = jmodel.apply(variables, images_nhwc, method=f)
        return pre @ variables["params"]["head"]["fc"]["kernel"] + variables["params"]["head"]["fc"]["bias"]

    out = np.asarray(embed(result.variables, x.transpose(0, 2, 3, 1)), np.float64)
    out /= np.linalg.norm(out, axis=-1, keepdims=True)
    cosine = (out * ref).sum(-1)
    assert (cosine >= 1 - 1e-6).all(), cosine
    logits = jax_logits(variant, True, result.variables, x)  # the classifier is the projection
    np.testing.assert_allclose(logits / np.linalg.norm(logits, axis=-1, keepdims=True), ref, atol=1e-6)


# --------------------------------------------------------------------------- training
@pytest.mark.xdist_group("mci0")
def test_fine_tune_a_converted_tower_with_a_new_head(tmp_path):
    """open_clip checkpoint -> Flax file -> the trainer (``train_tpu.py --variant mci0 --init_from``):
    the tower's body is loaded, the 512-wide CLIP head is replaced by a fresh 1000-class one. The
    data is a tiny ImageNet through the real tfds builder (8 validation images: the run's final
    evaluation of the weights and their EMA is short)."""
    from fake_imagenet import make_fake_imagenet
    from fastvit_jax.training import trainer
    from fastvit_jax.training.config import get_config

    with pytest.warns(UserWarning, match="open_clip checkpoint"):
        tower = convert_state_dict(_open_clip(_tower_sd("mci0")))
    model = fastvit_jax.create_model("mci0", num_classes=tower.num_classes)
    path = fastvit_jax.save_variables(str(tmp_path / "mci0.safetensors"), tower.variables, model=model)
    make_fake_imagenet(str(tmp_path / "tfds"), str(tmp_path / "manual"), num_classes_used=4, per_class=2, num_val=8)
    cfg = get_config(
        "mci0", dataset="imagenet2012", data_dir=str(tmp_path / "tfds"), workdir=str(tmp_path / "ft"), init_from=path,
        global_batch_size=8, image_size=32, num_epochs=None, num_steps=1, warmup_steps=1, eval_every=0,
        eval_batch_size=8, log_every=1, randaugment="", reprob=0.0, export=False, plot=False, progress=False)
    # native convs: the train step compiles ~3x faster on CPU than with the 'shift' default
    res = trainer.train_and_evaluate(cfg, model_fn=functools.partial(fastvit_jax.create_model, lowering="native"))
    params = jax.device_get(res.state.params)
    assert params["head"]["fc"]["kernel"].shape == (1024, 1000)
    loaded = tower.variables["params"]["stages_3"]["blocks_0"]["token_mixer"]["qkv"]["kernel"]
    np.testing.assert_allclose(params["stages_3"]["blocks_0"]["token_mixer"]["qkv"]["kernel"], loaded, atol=5e-3)
