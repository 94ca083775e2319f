"""Hostile or broken inputs to load_model, the converters, predict and export: each is one
`error:` line (exit 2, or 1 for an image predict skips), refused before anything large is
allocated: image sizes from the header, zip sizes from the directory, NaN/Inf by tensor name,
symbolic links that loop or dangle."""

import io
import struct
import zipfile
import zlib

import jax
import numpy as np
import pytest

import fastvit_jax
from convert import flax2torch, torch2flax
from fastvit_jax import export, predict
from fastvit_jax.transforms import ImageReadError, eval_transform
from fastvit_jax.weights.state_dict import ConversionError
from helpers import jit_init


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header says ``width`` x ``height`` (its pixel data is for 1 x 1)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # the IHDR chunk's CRC
    return bytes(data)


@pytest.fixture(scope="module")
def t8_file(tmp_path_factory):
    model = fastvit_jax.create_model("t8", num_classes=3, inference_mode=True,
                                     pretrained_cfg=fastvit_jax.pretrained_cfg("t8", num_classes=3, image_size=64))
    variables = jax.device_get(jit_init(model)(jax.random.PRNGKey(0), np.zeros((1, 64, 64, 3), np.float32)))
    path = tmp_path_factory.mktemp("hostile") / "t8.safetensors"
    fastvit_jax.save_variables(path, variables, model=model)
    return path, model, variables


@pytest.mark.parametrize("size, message", [((20000, 20000), r"20000 x 20000 = 400 megapixels, more than the 89 MP "
                                                             r"allowed \(--max_image_pixels\)"),
                                           ((1, 5000), r"1 x 5000, an aspect ratio of 5000:1, more than the 20:1 "
                                                       r"allowed \(--max_aspect_ratio\)")])
def test_decompression_bombs_are_refused_from_the_header(tmp_path, t8_file, capsys, size, message):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_claiming(*size))
    with pytest.raises(ImageReadError, match=message):
        eval_transform(fastvit_jax.pretrained_cfg("t8"))(str(bomb))
    ok = tmp_path / "ok.png"
    from PIL import Image

    Image.new("RGB", (70, 60), (120, 30, 200)).save(ok)
    assert predict.main([str(t8_file[0]), str(bomb), str(ok)]) == 1  # the bomb skipped, the other classified
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and str(bomb) in errors[0] and "Traceback" not in captured.err
    assert str(ok) in captured.out


def test_a_huge_file_that_is_not_an_image_is_refused_without_reading_it(tmp_path):
    import tracemalloc

    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.truncate(2 << 30)  # 2 GiB of zeros (sparse: nothing written)
    small = tmp_path / "small.jpg"
    small.write_bytes(bytes(1024))
    transform = eval_transform(fastvit_jax.pretrained_cfg("t8"))
    with pytest.raises(ImageReadError, match="not a JPEG, PNG, GIF, BMP or WebP file"):
        transform(str(small))  # the same path once, so that its imports are not counted below
    tracemalloc.start()
    try:
        with pytest.raises(ImageReadError, match="not a JPEG, PNG, GIF, BMP or WebP file"):
            transform(str(huge))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_zip_claiming_far_more_than_it_holds_is_refused(tmp_path):
    path = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("archive/data/0", b"\0" * (64 << 20))  # 64 MiB of zeros in ~64 KiB
    with pytest.raises(ConversionError, match=r"claims 64 MiB of tensors in a 0\.1 MiB file .*refusing to load it"):
        fastvit_jax.load_model(path)


@pytest.mark.parametrize("fmt", ["flax.safetensors", "torch.safetensors", "torch.pth"])
def test_nan_weights_are_refused_in_every_format_and_entry_point(tmp_path, t8_file, capsys, fmt):
    """One check (fastvit_jax.weights.state_dict.check_values) for every format: the file and the tensor named."""
    from convert.core import save_state_dict
    from fastvit_jax.weights import read_variables
    from fastvit_jax.weights.state_dict import variables_to_arrays

    _, model, variables = t8_file
    path = tmp_path / f"nan.{fmt.split('.', 1)[1]}"
    if fmt.startswith("flax"):
        params = jax.tree.map(np.array, variables["params"])
        params["head"]["fc"]["kernel"][0, 0] = np.nan
        fastvit_jax.save_variables(path, {**variables, "params": params}, model=model)
        tensor = "params/head/fc/kernel"
    else:
        arrays = dict(variables_to_arrays(variables)[0])
        arrays["head.fc.weight"] = np.where(np.arange(arrays["head.fc.weight"].size).reshape(
            arrays["head.fc.weight"].shape) == 1, np.inf, arrays["head.fc.weight"]).astype(np.float32)
        save_state_dict(str(path), arrays)
        tensor = "head.fc.weight"
    message = f"'{path}': {tensor} contains 1 NaN/Inf value(s)"
    for load in (fastvit_jax.load_model, read_variables):  # the library and the trainer's --init_from
        with pytest.raises(ConversionError) as info:
            load(path)
        assert message in str(info.value)
    converter = flax2torch.main if fmt.startswith("flax") else torch2flax.main
    for main, argv in ((predict.main, [path, tmp_path / "x.png"]), (export.main, [path, tmp_path / "c.onnx"]),
                       (converter, [path, tmp_path / ("out.pth" if fmt.startswith("flax") else "out.safetensors")])):
        assert main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert [line for line in err.splitlines() if line.startswith("error: ")] == [f"error: {message}; refusing "
                                                                                    f"to convert non-finite weights"]


@pytest.mark.parametrize("link", ["loop", "dangling"])
def test_symlinks_that_loop_or_dangle_are_one_line_in_every_entry_point(tmp_path, capsys, link):
    path = tmp_path / "ckpt.safetensors"
    if link == "loop":
        path.symlink_to(tmp_path / "ckpt.safetensors")
        expected = ("is a symbolic link that loops back on itself", "which loops back on itself or does not exist")
    else:
        path.symlink_to(tmp_path / "gone.safetensors")
        expected = ("which does not exist", "which loops back on itself or does not exist")
    for main, argv in ((torch2flax.main, [path, tmp_path / "a.safetensors"]),
                       (flax2torch.main, [path, tmp_path / "b.pth"]),
                       (predict.main, [path, tmp_path / "x.png"]),
                       (export.main, [path, tmp_path / "c.onnx"])):
        status = main([str(a) for a in argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert status == 2 and len(errors) == 1 and any(e in errors[0] for e in expected), (main.__module__, err)
        assert "Traceback" not in err
