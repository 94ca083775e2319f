"""fastvit_jax.load_model, pretrained_cfg, eval_transform and the predict CLI.

Every checkpoint layout and form loads in one call and gives torch_ref's logits; the
.safetensors paths run in a subprocess where ``import torch`` fails; the eval transform is
the trainer's validation transform; predict prints the top-5 the eval pipeline gives.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import fastvit_jax
import torch_ref
from fastvit_jax.weights.layouts import timm_to_apple
from fastvit_jax.weights.state_dict import ConversionError
from helpers import assert_parity, images, jit_init, torch_fused, torch_logits, torch_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def _run_python(code: str, cwd) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def t8_files(tmp_path_factory):
    """One non-trivial t8 in every published layout and form, plus the project's own files."""
    d = tmp_path_factory.mktemp("t8_files")
    model, fused = torch_model("t8"), torch_fused("t8")
    sd, fused_sd = model.state_dict(), fused.state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, d / "timm.safetensors")
    torch.save({"state_dict": timm_to_apple(sd, fastvit_jax.get_variant("t8"))}, d / "apple.pth.tar")
    torch.save({"state_dict": timm_to_apple(fused_sd, fastvit_jax.get_variant("t8"))}, d / "apple_reparam.pth.tar")
    jax_model, variables = fastvit_jax.load_model(d / "timm.safetensors")
    fastvit_jax.save_variables(d / "own_train.safetensors", variables, model=jax_model)
    fused_model, fused_vars = fastvit_jax.load_model(d / "timm.safetensors", inference_mode=True)
    fastvit_jax.save_variables(d / "own_fused.safetensors", fused_vars, model=fused_model)
    return d


@pytest.mark.parametrize("name, inference_mode, form", [
    ("timm.safetensors", None, "train"),
    ("timm.safetensors", True, "fused"),
    ("apple.pth.tar", None, "train"),
    ("apple_reparam.pth.tar", None, "fused"),
    ("own_train.safetensors", None, "train"),
    ("own_fused.safetensors", None, "fused"),
])
def test_load_model_matches_torch_ref(t8_files, name, inference_mode, form):
    model, variables = fastvit_jax.load_model(t8_files / name, inference_mode=inference_mode)
    assert model.cfg.name == "t8" and model.inference_mode == (form == "fused") and model.num_classes == 1000
    x = images((2, 3, 128, 128), seed=3)
    out = np.asarray(model.apply(variables, x.transpose(0, 2, 3, 1)))
    assert_parity(out, torch_logits(torch_model("t8"), x), what=f"{name} -> {form}")


def test_safetensors_paths_need_no_torch(t8_files):
    x = images((1, 3, 64, 64), seed=4)
    np.save(t8_files / "x.npy", x.transpose(0, 2, 3, 1))
    code = NO_TORCH + textwrap.dedent(f"""
        import numpy as np, fastvit_jax
        from convert import torch2flax
        x = np.load({str(t8_files / 'x.npy')!r})
        for name in ("timm.safetensors", "own_fused.safetensors"):
            model, variables = fastvit_jax.load_model({str(t8_files)!r} + "/" + name)
            np.save({str(t8_files)!r} + "/" + name + ".npy", np.asarray(model.apply(variables, x)))
        assert torch2flax.main([{str(t8_files / 'timm.safetensors')!r}, {str(t8_files / 'cli.safetensors')!r}]) == 0
        try:
            fastvit_jax.load_model({str(t8_files / 'apple.pth.tar')!r})
        except ValueError as e:
            print("PICKLE:", e)
        assert "torch" not in sys.modules or sys.modules["torch"] is None
    """)
    proc = _run_python(code, t8_files)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "PICKLE:" in proc.stdout and "needs PyTorch (pip install torch==2.13.0)" in proc.stdout
    ref = torch_logits(torch_model("t8"), x)
    for name in ("timm.safetensors", "own_fused.safetensors"):
        assert_parity(np.load(t8_files / f"{name}.npy"), ref, what=f"{name} without torch")
    assert fastvit_jax.load_model(t8_files / "cli.safetensors")[0].cfg.name == "t8"


def test_new_head_is_logged_and_seeded(t8_files, caplog):
    with caplog.at_level(logging.INFO, logger="fastvit_jax"):
        model, variables = fastvit_jax.load_model(t8_files / "timm.safetensors", num_classes=10,
                                                  rng=jax.random.key(3))
    assert "replaced the 1000-class head" in caplog.text and "new 10-class head" in caplog.text
    assert model.num_classes == 10 and model.pretrained_cfg.num_classes == 10
    kernel = np.asarray(variables["params"]["head"]["fc"]["kernel"])
    assert kernel.shape == (768, 10) and 0.01 < kernel.std() < 0.03
    again = fastvit_jax.load_model(t8_files / "timm.safetensors", num_classes=10, rng=jax.random.key(3))[1]
    np.testing.assert_array_equal(kernel, again["params"]["head"]["fc"]["kernel"])
    # Everything but the head is the file's.
    _, original = fastvit_jax.load_model(t8_files / "timm.safetensors")
    np.testing.assert_array_equal(original["params"]["final_conv"]["se"]["fc1"]["kernel"],
                                  variables["params"]["final_conv"]["se"]["fc1"]["kernel"])
    features = fastvit_jax.load_model(t8_files / "timm.safetensors", num_classes=0)
    assert features[1]["params"]["head"] == {}
    assert features[0].apply(features[1], np.zeros((1, 64, 64, 3), np.float32)).shape == (1, 768)


def test_metadata_round_trip_and_contradictions(t8_files, tmp_path):
    model, variables = fastvit_jax.load_model(t8_files / "timm.safetensors")
    cfg = model.pretrained_cfg.replace(input_size=(3, 96, 96), crop_pct=1.0)
    custom = fastvit_jax.create_model("t8", pretrained_cfg=cfg)
    fastvit_jax.save_variables(tmp_path / "v.safetensors", variables, model=custom)
    loaded_model, _ = fastvit_jax.load_model(tmp_path / "v.safetensors")
    assert loaded_model.pretrained_cfg == cfg
    with pytest.raises(ConversionError, match="contradicts the checkpoint: its keys and shapes are those of t8"):
        fastvit_jax.load_model(t8_files / "timm.safetensors", variant="sa12")
    with pytest.raises(ValueError, match="cannot be turned back into the train form"):
        fastvit_jax.load_model(t8_files / "own_fused.safetensors", inference_mode=False)
    fastvit_jax.save_variables(tmp_path / "lying.safetensors", variables, metadata={"variant": "sa12"})
    with pytest.raises(ConversionError, match="metadata says variant 'sa12' but its tensors are FastViT-t8"):
        fastvit_jax.load_model(tmp_path / "lying.safetensors")
    with pytest.raises(ValueError, match="PyTorch-layout state_dict.*load_model"):
        fastvit_jax.load_variables(t8_files / "timm.safetensors")
    assert oct(os.stat(t8_files / "own_train.safetensors").st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_pretrained_cfg_values_for_every_variant():
    # timm's fastvit_*.apple_in1k configs: crop 0.9 except ma36 (0.95); 256 px, bicubic, ImageNet mean/std.
    crops = {"t8": 0.9, "t12": 0.9, "s12": 0.9, "sa12": 0.9, "sa24": 0.9, "sa36": 0.9, "ma36": 0.95}
    features = {"t8": 768, "t12": 1024, "s12": 1024, "sa12": 1024, "sa24": 1024, "sa36": 1024, "ma36": 1216}
    for variant in fastvit_jax.VARIANTS:
        cfg = fastvit_jax.pretrained_cfg(variant)
        assert (cfg.input_size, cfg.crop_pct, cfg.interpolation, cfg.num_classes) == ((3, 256, 256), crops[variant],
                                                                                      "bicubic", 1000)
        assert cfg.mean == (0.485, 0.456, 0.406) and cfg.std == (0.229, 0.224, 0.225)
        assert cfg.num_features == features[variant] and cfg.classifier == "head.fc"
        assert cfg.first_conv == ("stem.0.conv_kxk.0.conv", "stem.0.conv_scale.conv")
        assert fastvit_jax.create_model(variant).pretrained_cfg == cfg
        assert fastvit_jax.PretrainedCfg.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        assert set(torch_ref.create_model(variant).state_dict()) >= {f"{cfg.classifier}.weight",
                                                                     f"{cfg.first_conv[0]}.weight"}


def test_star_import_and_all_names_resolve():
    namespace: dict = {}
    exec("from fastvit_jax import *", namespace)
    for name in fastvit_jax.__all__:
        assert name in namespace, name
    assert namespace["FastVit"] is fastvit_jax.model.FastVit


def test_forward_stages_out_indices():
    model = fastvit_jax.create_model("t8")
    x = np.zeros((1, 64, 64, 3), np.float32)
    variables = jit_init(model)(jax.random.key(0), x)
    stages = jax.jit(lambda v, x, out_indices=None: model.apply(v, x, method=model.forward_stages,
                                                                out_indices=out_indices), static_argnames="out_indices")
    every = stages(variables, x)
    picked = stages(variables, x, out_indices=(1, -1))
    assert [f.shape for f in every] == [(1, 16, 16, 48), (1, 8, 8, 96), (1, 4, 4, 192), (1, 2, 2, 384)]
    assert [f.shape for f in picked] == [every[1].shape, every[3].shape]
    np.testing.assert_array_equal(picked[0], every[1])
    with pytest.raises(ValueError, match="out_indices entry 4 is out of range for 4 stages"):
        stages(variables, x, out_indices=(4,))


# --------------------------------------------------------------------------- transform + predict
@pytest.fixture(scope="module")
def val_jpegs(tmp_path_factory):
    """Fake ImageNet (the real imagenet2012 builder) and its validation JPEGs as files."""
    import tarfile

    from fake_imagenet import make_fake_imagenet

    root = tmp_path_factory.mktemp("imagenet")
    data_dir, manual = str(root / "tfds"), str(root / "manual")
    make_fake_imagenet(data_dir, manual, num_classes_used=2, per_class=2, num_val=3)
    with tarfile.open(os.path.join(manual, "ILSVRC2012_img_val.tar")) as tar:
        tar.extractall(root / "jpegs", filter="data")
    return data_dir, sorted(str(p) for p in (root / "jpegs").iterdir())


def _eval_pipeline_images(data_dir, cfg):
    from fastvit_jax.data.pipeline import make_eval_dataset

    batches = make_eval_dataset("imagenet2012", data_dir, batch_size=8, image_size=cfg.image_size,
                                crop_pct=cfg.crop_pct).as_numpy_iterator()
    return np.concatenate([b["image"][b["mask"] > 0] for b in batches])


def _match(a: np.ndarray, pool: np.ndarray) -> int:
    distances = np.abs(pool - a[None]).reshape(len(pool), -1).max(-1)
    assert distances.min() <= 1e-5, f"no pipeline image within 1e-5 (closest {distances.min():.2e})"
    return int(distances.argmin())


def test_eval_transform_is_the_validation_pipeline(val_jpegs):
    from PIL import Image

    data_dir, paths = val_jpegs
    cfg = fastvit_jax.pretrained_cfg("t8", image_size=64)
    pool = _eval_pipeline_images(data_dir, cfg)
    transform = fastvit_jax.eval_transform(cfg)
    by_path = transform(paths)
    assert by_path.shape == (len(paths), 64, 64, 3) and by_path.dtype == np.float32
    assert sorted(_match(a, pool) for a in by_path) == list(range(len(paths)))
    with open(paths[0], "rb") as f:
        np.testing.assert_array_equal(transform(f.read())[0], by_path[0])
    decoded = np.asarray(Image.open(paths[0]).convert("RGB"))
    # PIL's and TF's JPEG decoders may differ by a grey level: close, not bit-equal.
    assert np.abs(transform(decoded)[0] - by_path[0]).max() < 0.1
    np.testing.assert_array_equal(transform(decoded[None])[0], transform(Image.open(paths[0]))[0])


def test_predict_cli_top5_equals_eval_pipeline(val_jpegs, t8_files, tmp_path):
    data_dir, paths = val_jpegs
    model, variables = fastvit_jax.load_model(t8_files / "timm.safetensors", inference_mode=True)
    cfg = model.pretrained_cfg.replace(input_size=(3, 64, 64))
    ckpt = tmp_path / "t8_64.safetensors"
    fastvit_jax.save_variables(ckpt, variables, model=fastvit_jax.create_model("t8", inference_mode=True,
                                                                               pretrained_cfg=cfg))
    pool = _eval_pipeline_images(data_dir, cfg)
    pipeline_logits = np.asarray(model.apply(variables, pool))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "fastvit_jax.predict", str(ckpt), *paths, str(broken), "--json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {broken}: cannot decode the image: not a JPEG, PNG, GIF, BMP or WebP file"]
    assert "Traceback" not in proc.stderr
    results = json.loads(proc.stdout)["results"]
    transform = fastvit_jax.eval_transform(cfg)
    assert [r["image"] for r in results] == paths
    for result in results:
        row = pipeline_logits[_match(transform(result["image"])[0], pool)]
        assert [e["index"] for e in result["top"]] == list(np.argsort(-row, kind="stable")[:5])
        assert result["top"][0]["label"] in open(os.path.join(ROOT, "fastvit_jax", "imagenet_classes.tsv")).read()


def test_predict_cli_bad_checkpoint(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    proc = subprocess.run([sys.executable, "-m", "fastvit_jax.predict", str(bad), "x.jpg"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert f"error: {str(bad)!r} is not a readable .safetensors file" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("shape, fragment", [
    ((1, 3, 64, 64), "looks NCHW: transpose it with x.transpose(0, 2, 3, 1)"),
    ((64, 64, 3), "add a batch axis (x[None])"),
    ((1, 64, 64, 1), "(1 channels): convert grey or RGBA images to RGB"),
    ((64, 64), "got shape (64, 64)"),
])
def test_apply_names_a_wrong_input_layout(shape, fragment):
    model = fastvit_jax.create_model("t8")
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), np.zeros((1, 64, 64, 3), np.float32)))
    with pytest.raises(ValueError, match=re.escape(fragment)):
        model.apply(variables, np.zeros(shape, np.float32))


@pytest.mark.parametrize("fused_vars, fused_model, fragment", [
    (True, False, "these variables are the fused (inference) form: build the model with "
                  "create_model(..., inference_mode=True)"),
    (False, True, "fuse them first with fastvit_jax.reparameterize(variables)"),
])
def test_apply_names_a_variables_form_mismatch(fused_vars, fused_model, fragment):
    x = np.zeros((1, 64, 64, 3), np.float32)
    variables = jax.eval_shape(lambda: fastvit_jax.create_model("t8", inference_mode=fused_vars).init(
        jax.random.key(0), x))
    model = fastvit_jax.create_model("t8", inference_mode=fused_model)
    with pytest.raises(ValueError, match=re.escape(fragment)):
        jax.eval_shape(lambda: model.apply(variables, x))


def _hub_cache(root, repo: str, files: dict) -> None:
    """Lays out a Hugging Face cache (HF_HUB_CACHE) holding ``repo`` at one commit with ``files``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    base = root / ("models--" + repo.replace("/", "--"))
    (base / "refs").mkdir(parents=True)
    (base / "refs" / "main").write_text(commit)
    snapshot = base / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for name, source in files.items():
        (snapshot / name).write_bytes(source.read_bytes())


def test_hub_names_load_from_the_cache_offline(t8_files, tmp_path, monkeypatch):
    """load_model('hf-hub:...') and create_model(..., pretrained=True) read the Hub cache with
    HF_HUB_OFFLINE; a repository that is not cached, or a malformed name, is one clear error."""
    from huggingface_hub import constants

    from fastvit_jax import hub

    cache = tmp_path / "hub"
    _hub_cache(cache, "timm/fastvit_t8.apple_in1k", {"model.safetensors": t8_files / "timm.safetensors",
                                                     "config.json": t8_files / "timm.safetensors"})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # as HF_HOME / HF_HUB_OFFLINE=1 set them
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    x = images((2, 3, 64, 64), seed=4).transpose(0, 2, 3, 1)
    reference, ref_vars = fastvit_jax.load_model(t8_files / "timm.safetensors")
    expected = np.asarray(reference.apply(ref_vars, x))

    model, variables = fastvit_jax.load_model("hf-hub:timm/fastvit_t8.apple_in1k")
    np.testing.assert_array_equal(np.asarray(model.apply(variables, x)), expected)
    bound = fastvit_jax.create_model("t8", pretrained=True)  # timm's habit: the module, bound to its weights
    np.testing.assert_array_equal(np.asarray(bound(x)), expected)
    assert fastvit_jax.create_model("t8", pretrained=True, num_classes=5).unbind()[0].num_classes == 5

    with pytest.raises(hub.HubError, match=r"timm/fastvit_sa12\.apple_in1k is not in the Hugging Face cache \(.*hub\) "
                                           r"and HF_HUB_OFFLINE is set"):
        fastvit_jax.load_model("hf-hub:timm/fastvit_sa12.apple_in1k")
    with pytest.raises(hub.HubError, match="not a hub name of the form hf-hub:OWNER/REPO"):
        fastvit_jax.load_model("hf-hub:fastvit_t8")
    with pytest.raises(ValueError, match="no default pretrained weights for mci0"):
        fastvit_jax.create_model("mci0", pretrained=True)


def test_predict_names_classes_from_the_file_and_prints_embeddings(tmp_path, capsys):
    """A fine-tuned export's class names are printed; a model without classifier (or a MobileCLIP
    tower) prints its embedding, never a softmax over its dimensions."""
    from PIL import Image

    from fastvit_jax import predict

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 70, 3), dtype=np.uint8)).save(image)
    names = ("cat", "dog", "fox")
    for classes, label_names in ((3, names), (0, ())):
        cfg = fastvit_jax.pretrained_cfg("t8", num_classes=classes, image_size=64).replace(label_names=label_names)
        model = fastvit_jax.create_model("t8", num_classes=classes, inference_mode=True, pretrained_cfg=cfg)
        variables = jit_init(model)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32))
        path = tmp_path / f"m{classes}.safetensors"
        fastvit_jax.save_variables(path, jax.device_get(variables), model=model)
        capsys.readouterr()
        assert predict.main([str(path), str(image), "--top", "3"]) == 0
        out = capsys.readouterr().out
        if classes:
            assert sorted(line.split()[-1] for line in out.splitlines()[1:]) == sorted(names)
        else:
            assert "embedding (768 values, L2 norm" in out
            assert predict.main([str(path), str(image), "--json"]) == 0
            result = json.loads(capsys.readouterr().out)["results"][0]
            assert len(result["embedding"]) == 768 and "top" not in result
    assert predict.is_embedding_model(fastvit_jax.create_model("mci0"))  # the CLIP projection, not classes
    assert not predict.is_embedding_model(fastvit_jax.create_model("mci0", num_classes=10))
    assert not predict.is_embedding_model(fastvit_jax.create_model("t8"))
