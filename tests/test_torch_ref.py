"""torch_ref: exact parameter counts, fusion parity, state_dict round trip, input sizes."""

import io

import pytest
import torch

import torch_ref
from fastvit_variants import OFFICIAL_PARAM_COUNTS, VARIANTS
from fastvit_jax.compare import relative_error
from torch_ref.testing import make_nontrivial

# State-dict sizes of Apple's/timm's train form (BN buffers included).
STATE_DICT_KEYS = {"t8": 462, "t12": 530, "s12": 530, "sa12": 504, "sa24": 884, "sa36": 1264, "ma36": 1264}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_parameter_counts_match_official(variant):
    train_count, fused_count = OFFICIAL_PARAM_COUNTS[variant]
    model = torch_ref.create_model(variant)
    assert n_params(model) == train_count
    assert len(model.state_dict()) == STATE_DICT_KEYS[variant]
    assert n_params(torch_ref.create_model(variant, inference_mode=True)) == fused_count
    assert n_params(torch_ref.reparameterize_model(model)) == fused_count


def test_timm_key_layout_sa12():
    sd = torch_ref.create_model("sa12").state_dict()
    expected = {
        "stem.0.conv_kxk.0.conv.weight": (64, 3, 3, 3),
        "stem.0.conv_scale.conv.weight": (64, 3, 1, 1),
        "stem.1.conv_kxk.0.conv.weight": (64, 1, 3, 3),
        "stem.2.identity.running_var": (64,),
        "stages.0.blocks.0.token_mixer.layer_scale.gamma": (64, 1, 1),
        "stages.0.blocks.0.token_mixer.norm.identity.weight": (64,),
        "stages.0.blocks.0.token_mixer.mixer.conv_scale.conv.weight": (64, 1, 1, 1),
        "stages.0.blocks.0.mlp.conv.conv.weight": (64, 1, 7, 7),
        "stages.0.blocks.0.mlp.fc1.weight": (256, 64, 1, 1),
        "stages.0.blocks.0.layer_scale.gamma": (64, 1, 1),
        "stages.1.downsample.proj.0.large_conv.conv.weight": (128, 1, 7, 7),
        "stages.1.downsample.proj.0.small_conv.conv.weight": (128, 1, 3, 3),
        "stages.1.downsample.proj.1.identity.weight": (128,),
        "stages.3.pos_emb.pos_enc.weight": (512, 1, 7, 7),
        "stages.3.pos_emb.pos_enc.bias": (512,),
        "stages.3.blocks.0.norm.running_mean": (512,),
        "stages.3.blocks.0.token_mixer.qkv.weight": (1536, 512),
        "stages.3.blocks.0.layer_scale_2.gamma": (512, 1, 1),
        "final_conv.conv_kxk.0.conv.weight": (1024, 1, 3, 3),
        "final_conv.se.fc1.weight": (64, 1024, 1, 1),
        "head.fc.weight": (1000, 1024),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert "stages.3.blocks.0.token_mixer.qkv.bias" not in sd


def test_variant_names_and_errors():
    assert torch_ref.create_model("fastvit_t8").cfg.name == "t8"
    with pytest.raises(ValueError, match=r"unknown FastViT variant 'fastvit_b0'.*t8, t12, s12, sa12, sa24, sa36, ma36"):
        torch_ref.create_model("fastvit_b0")


def test_layer_scale_init_per_variant():
    assert torch_ref.create_model("sa12").stages[0].blocks[0].layer_scale.gamma.flatten()[0].item() == pytest.approx(1e-5)
    assert torch_ref.create_model("sa36").stages[0].blocks[0].layer_scale.gamma.flatten()[0].item() == pytest.approx(1e-6)


def test_drop_path_schedule_is_linear_over_all_blocks():
    model = torch_ref.create_model("t8", drop_path_rate=0.1)
    rates = [b.drop_path.rate for s in model.stages for b in s.blocks]
    assert len(rates) == 10
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert rates[3] == pytest.approx(0.1 * 3 / 9)


@pytest.fixture(scope="module")
def nontrivial_models():
    """One calibrated train-form model per variant, shared by the parity tests."""
    cache = {}

    def get(variant):
        if variant not in cache:
            torch.manual_seed(0)
            cache[variant] = make_nontrivial(torch_ref.create_model(variant), seed=1, image_size=128)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", VARIANTS)
def test_fused_matches_unfused(variant, nontrivial_models):
    model = nontrivial_models(variant)
    fused = torch_ref.reparameterize_model(model)
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref, out = model(x), fused(x)
        other = model(torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(4)))
    assert (ref - other).abs().max() > 0.05 * ref.abs().max(), "logits must depend on the input"
    assert relative_error(out, ref) <= 1e-5
    assert torch.equal(out.argmax(1), ref.argmax(1))
    # The input model is left unchanged (still the train form).
    assert model.stem[0].reparam_conv is None and hasattr(model.stem[0], "conv_kxk")


@pytest.mark.parametrize("variant", ["t8", "sa12"])
def test_fused_state_dict_round_trip(variant, nontrivial_models):
    fused = torch_ref.reparameterize_model(nontrivial_models(variant))
    buf = io.BytesIO()
    torch.save(fused.state_dict(), buf)
    buf.seek(0)
    rebuilt = torch_ref.create_model(variant, inference_mode=True)
    rebuilt.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    rebuilt.eval()
    x = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), fused(x))


@pytest.mark.parametrize("size", [(224, 224), (256, 256), (384, 384), (256, 320)])
def test_input_sizes_divisible_by_32(size, nontrivial_models):
    model = nontrivial_models("sa12")
    fused = torch_ref.reparameterize_model(model)
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        ref = model(x)
        assert ref.shape == (1, 1000)
        assert relative_error(fused(x), ref) <= 1e-5
        feats = model.forward_stages(x)
    h, w = size
    assert [tuple(f.shape) for f in feats] == [
        (1, 64, h // 4, w // 4), (1, 128, h // 8, w // 8), (1, 256, h // 16, w // 16), (1, 512, h // 32, w // 32)]
    assert model.forward_features(x).shape == (1, 1024, h // 32, w // 32)


def test_train_mode_updates_batchnorm_and_drop_path_is_stochastic():
    model = torch_ref.create_model("t8", drop_path_rate=0.5).train()
    before = model.stem[0].conv_kxk[0].bn.running_mean.clone()
    x = torch.randn(2, 3, 64, 64)
    a, b = model(x), model(x)
    assert not torch.equal(model.stem[0].conv_kxk[0].bn.running_mean, before)
    assert not torch.allclose(a, b)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
