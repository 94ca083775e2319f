"""convert/torch2flax.py and convert/flax2torch.py: happy paths and every bad input.

Each bad input must print one message naming the problem, exit with status 2, and leave
no OUTPUT (and no temporary file) behind.
"""

import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torch_ref
from convert import flax2torch, torch2flax
from fastvit_jax.weights.layouts import timm_to_apple
from fastvit_jax.io import load_metadata, load_variables
from fastvit_variants import get_variant

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def t8_sd():
    torch.manual_seed(0)
    return torch_ref.create_model("t8").state_dict()


def _run(main, argv, capsys):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def _assert_refused(tmp_path, rc, err, *fragments, output="out.safetensors"):
    assert rc == 2, err
    assert err.startswith("error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in {err!r}"
    assert not (tmp_path / output).exists()
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p], "temporary file left behind"


def test_wrapped_pth_tar_with_module_prefix(tmp_path, capsys, t8_sd):
    ckpt = tmp_path / "fastvit_t8.pth.tar"
    torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in t8_sd.items()}}, ckpt)
    rc, out, err = _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors", "--variant", "fastvit_t8"], capsys)
    assert rc == 0, err
    assert "[1/4]" in out and "[4/4]" in out
    assert "summary: variant=t8 layout=timm form=train params=4,026,232 classes=1000" in out
    variables = load_variables(tmp_path / "out.safetensors")
    assert set(variables) == {"params", "batch_stats"}
    np.testing.assert_array_equal(variables["params"]["head"]["fc"]["kernel"], t8_sd["head.fc.weight"].numpy().T)
    assert load_metadata(tmp_path / "out.safetensors")["form"] == "train"


def test_apple_safetensors_to_fused_and_back_to_apple_pth(tmp_path, capsys, t8_sd):
    ckpt = tmp_path / "apple_t8.safetensors"
    save_file({k: v.contiguous() for k, v in timm_to_apple(t8_sd, get_variant("t8")).items()}, ckpt)
    rc, out, err = _run(torch2flax.main, [ckpt, tmp_path / "fused.safetensors", "--fused"], capsys)
    assert rc == 0, err
    assert "layout=apple form=fused params=3,996,040" in out
    rc, out, err = _run(flax2torch.main, [tmp_path / "fused.safetensors", tmp_path / "back.pth", "--layout", "apple"],
                        capsys)
    assert rc == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert "network.1.proj.0.lkb_reparam.weight" in back and "patch_embed.0.reparam_conv.weight" in back
    rc, out, err = _run(flax2torch.main, [tmp_path / "fused.safetensors", tmp_path / "back.safetensors"], capsys)
    assert rc == 0, err
    from safetensors.torch import load_file

    fused = torch_ref.create_model("t8", inference_mode=True)
    fused.load_state_dict(load_file(tmp_path / "back.safetensors"), strict=True)


def _ckpt(tmp_path, sd, name="in.pth"):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def _bad(tmp_path, capsys, sd_or_path, *fragments, extra=()):
    path = sd_or_path if isinstance(sd_or_path, (str, os.PathLike)) else _ckpt(tmp_path, sd_or_path)
    rc, _, err = _run(torch2flax.main, [path, tmp_path / "out.safetensors", *extra], capsys)
    _assert_refused(tmp_path, rc, err, *fragments)
    return err


def test_unknown_layout(tmp_path, capsys):
    _bad(tmp_path, capsys, {"encoder.layer.0.weight": torch.zeros(3)}, "unknown layout", "encoder.layer.0.weight")


def test_mixed_layout(tmp_path, capsys, t8_sd):
    sd = dict(t8_sd)
    sd["patch_embed.0.rbr_conv.0.conv.weight"] = torch.zeros(48, 3, 3, 3)
    _bad(tmp_path, capsys, sd, "mixed layout")


def test_missing_keys_named_with_count(tmp_path, capsys, t8_sd):
    sd = {k: v for k, v in t8_sd.items() if not k.startswith("stages.1.blocks.0.mlp")}
    err = _bad(tmp_path, capsys, sd, "missing keys: stages.1.blocks.0.mlp.conv.bn.weight", "(10 in all)")
    assert "closest is t8" in err


def test_unexpected_keys(tmp_path, capsys, t8_sd):
    sd = dict(t8_sd)
    sd["stages.0.blocks.0.extra.weight"] = torch.zeros(2)
    _bad(tmp_path, capsys, sd, "unexpected keys: stages.0.blocks.0.extra.weight (1)")


def test_shape_mismatch(tmp_path, capsys, t8_sd):
    sd = dict(t8_sd)
    sd["stages.0.blocks.0.mlp.fc1.weight"] = torch.zeros(150, 48, 1, 1)
    _bad(tmp_path, capsys, sd, "shape mismatch at stages.0.blocks.0.mlp.fc1.weight: expected (144, 48, 1, 1), "
                               "found (150, 48, 1, 1)")


def test_variant_contradicting_shapes(tmp_path, capsys, t8_sd):
    _bad(tmp_path, capsys, t8_sd, "--variant sa12 contradicts the checkpoint", "those of t8", extra=["--variant", "sa12"])


def test_unknown_variant_flag(tmp_path, capsys, t8_sd):
    _bad(tmp_path, capsys, t8_sd, "unknown FastViT variant 'b0'", "t8, t12", extra=["--variant", "b0"])


def test_non_float_weight(tmp_path, capsys, t8_sd):
    sd = dict(t8_sd)
    sd["head.fc.bias"] = torch.zeros(1000, dtype=torch.int64)
    _bad(tmp_path, capsys, sd, "head.fc.bias holds an int64 tensor; a float weight is expected")


def test_nan_weights(tmp_path, capsys, t8_sd):
    sd = dict(t8_sd)
    w = sd["stem.0.conv_kxk.0.conv.weight"].clone()
    w[0, 0, 0, 0] = float("nan")
    w[1, 0, 0, 0] = float("inf")
    sd["stem.0.conv_kxk.0.conv.weight"] = w
    _bad(tmp_path, capsys, sd, "stem.0.conv_kxk.0.conv.weight contains 2 NaN/Inf value(s)")


def test_not_a_checkpoint(tmp_path, capsys):
    text = tmp_path / "notes.pth"
    text.write_text("hello")
    _bad(tmp_path, capsys, text, "is not a PyTorch checkpoint")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 10)
    _bad(tmp_path, capsys, junk, "not a readable .safetensors file")
    _bad(tmp_path, capsys, tmp_path / "missing.pth", "does not exist")


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_arbitrary_pickle_is_not_executed(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    _bad(tmp_path, capsys, path, "weights_only=True", "nothing in it was run")
    torch.save({"state_dict": Evil()}, path)  # what a malicious .pth usually is: a zip whose pickle calls a global
    rc, _, err = _run(torch2flax.main, [path, tmp_path / "out.safetensors"], capsys)
    assert rc == 2 and "unsupported GLOBAL posix.system" in err and "weights_only` set to `False`" not in err, err


def test_non_tensor_entries(tmp_path, capsys):
    _bad(tmp_path, capsys, {"stem.0.x": [1, 2]}, "entry 'stem.0.x' is a list, not a tensor")


def test_existing_output_refused_unless_overwrite(tmp_path, capsys, t8_sd):
    ckpt = _ckpt(tmp_path, t8_sd)
    out = tmp_path / "out.safetensors"
    out.write_text("precious")
    rc, _, err = _run(torch2flax.main, [ckpt, out], capsys)
    assert rc == 2 and "exists; pass --overwrite" in err
    assert out.read_text() == "precious"
    rc, _, err = _run(torch2flax.main, [ckpt, out, "--overwrite"], capsys)
    assert rc == 0, err
    assert load_variables(out)["params"]


def test_flax2torch_bad_inputs(tmp_path, capsys, t8_sd):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"junk")
    rc, _, err = _run(flax2torch.main, [junk, tmp_path / "out.pth"], capsys)
    _assert_refused(tmp_path, rc, err, "not a safetensors variables file", output="out.pth")
    rc, _, err = _run(flax2torch.main, [tmp_path / "none.safetensors", tmp_path / "out.pth"], capsys)
    _assert_refused(tmp_path, rc, err, "no variables file", output="out.pth")
    from convert.core import convert_state_dict
    from fastvit_jax.io import save_variables

    variables = convert_state_dict(t8_sd).variables
    del variables["params"]["final_conv"]["se"]
    save_variables(tmp_path / "broken.safetensors", variables)
    rc, _, err = _run(flax2torch.main, [tmp_path / "broken.safetensors", tmp_path / "out.pth"], capsys)
    _assert_refused(tmp_path, rc, err, "closest is t8", output="out.pth")
    rc, _, err = _run(flax2torch.main, [tmp_path / "broken.safetensors", tmp_path / "out.txt"], capsys)
    assert rc == 2


def test_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.pth"
    bad.write_text("not a checkpoint")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "torch2flax.py"), str(bad),
                           str(tmp_path / "out.safetensors")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "error:" in proc.stderr
    assert not (tmp_path / "out.safetensors").exists()
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "convert", "flax2torch.py"), "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "--layout" in help_text


# --------------------------------------------------------------------------- nothing lost, one line per failure
def _digest(path) -> str:
    import hashlib

    return hashlib.sha256(open(path, "rb").read()).hexdigest()


@pytest.mark.parametrize("how", ["same path", "symlink", "hard link"])
def test_output_that_is_the_input_is_refused_even_with_overwrite(tmp_path, capsys, t8_sd, how):
    ckpt = tmp_path / "in.safetensors"
    save_file({k: v.contiguous() for k, v in t8_sd.items()}, ckpt)
    before = _digest(ckpt)
    out = {"same path": ckpt, "symlink": tmp_path / "link.safetensors", "hard link": tmp_path / "hard.safetensors"}[how]
    if how == "symlink":
        os.symlink(ckpt, out)
    elif how == "hard link":
        os.link(ckpt, out)
    rc, _, err = _run(torch2flax.main, [ckpt, out, "--overwrite"], capsys)
    assert rc == 2 and "refusing to overwrite an input" in err and "Traceback" not in err
    assert _digest(ckpt) == before
    # flax2torch: a Flax file converted "back" onto itself.
    flax = tmp_path / "flax.safetensors"
    assert _run(torch2flax.main, [ckpt, flax], capsys)[0] == 0
    flax_before = _digest(flax)
    rc, _, err = _run(flax2torch.main, [flax, flax, "--overwrite"], capsys)
    assert rc == 2 and "refusing to overwrite an input" in err
    assert _digest(flax) == flax_before


def test_stale_temp_file_of_a_killed_run_is_removed(tmp_path, capsys, t8_sd):
    ckpt = _ckpt(tmp_path, t8_sd)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.safetensors.tmp-{int(dead.stdout)}"
    stale.write_bytes(b"")
    alive = tmp_path / f".out.safetensors.tmp-{os.getpid()}0"  # a name whose pid is not ours: left alone if alive
    rc, _, err = _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors"], capsys)
    assert rc == 0, err
    assert not stale.exists()
    assert not alive.exists()  # never created


def test_a_converter_killed_while_writing_leaves_only_its_named_temporary_file(tmp_path, t8_sd):
    """kill -9 in the middle of the write: the only leftover is ``.<name>.tmp-<pid>`` (the next run
    removes it), never a temporary file of a library under a name nobody can attribute."""
    import signal
    import time

    ckpt, out_dir = _ckpt(tmp_path, t8_sd), tmp_path / "out"
    out_dir.mkdir()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert", "torch2flax.py")
    for attempt in range(5):  # the write takes milliseconds: catch it in the act
        proc = subprocess.Popen([sys.executable, script, str(ckpt), str(out_dir / "out.safetensors")],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not os.listdir(out_dir):
            time.sleep(0.0002)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        left = os.listdir(out_dir)
        if left != ["out.safetensors"]:
            break
        os.remove(out_dir / "out.safetensors")
    else:
        pytest.skip("the write always finished before it could be killed")
    assert left == [f".out.safetensors.tmp-{proc.pid}"], left
    r = subprocess.run([sys.executable, script, str(ckpt), str(out_dir / "out.safetensors")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    assert os.listdir(out_dir) == ["out.safetensors"]


def test_disk_full_is_one_line_and_leaves_nothing(tmp_path, capsys, t8_sd, monkeypatch):
    import errno

    import fastvit_jax.io

    def full(*args, **kwargs):
        with open(args[1], "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(fastvit_jax.io, "write_safetensors", full)
    ckpt = _ckpt(tmp_path, t8_sd)
    rc, _, err = _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors"], capsys)
    _assert_refused(tmp_path, rc, err, "no space left on the device (needs about 15.", "MiB free in")
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("code, fragment", [(13, "permission denied in"), (30, "is on a read-only file system")])
def test_unwritable_output_is_one_line(tmp_path, capsys, t8_sd, monkeypatch, code, fragment):
    import fastvit_jax.io

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(fastvit_jax.io, "write_safetensors", refuse)
    ckpt = _ckpt(tmp_path, t8_sd)
    rc, _, err = _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors"], capsys)
    _assert_refused(tmp_path, rc, err, fragment)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0555 directory: use the injected EACCES test")
def test_read_only_output_directory(tmp_path, capsys, t8_sd):
    ckpt = _ckpt(tmp_path, t8_sd)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    rc, _, err = _run(torch2flax.main, [ckpt, locked / "out.safetensors"], capsys)
    assert rc == 2 and "permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize("tool, mount_options, fragment", [
    ("torch2flax", "size=1m", r"no space left on the device \(needs about 15\.\d MiB, [0-9.]+ MiB free in "),
    ("torch2flax", "ro,size=1m", r"is on a read-only file system$"),
    ("flax2torch", "size=1m", r"no space left on the device \(needs about 15\.\d MiB, [0-9.]+ MiB free in "),
])
def test_real_full_and_read_only_file_systems(tmp_path, capsys, t8_sd, tool, mount_options, fragment):
    """The CLIs on a real 1 MiB / read-only tmpfs: exit 2, one line, the input untouched, nothing left."""
    import re

    from tmpfs import run_with_tmpfs, tmpfs_unavailable

    reason = tmpfs_unavailable(tmp_path)
    if reason:
        pytest.skip(reason)
    source = _ckpt(tmp_path, t8_sd)
    if tool == "flax2torch":
        assert _run(torch2flax.main, [source, tmp_path / "flax.safetensors"], capsys)[0] == 0
        source = tmp_path / "flax.safetensors"
    before, mnt = _digest(source), tmp_path / "mnt"
    mnt.mkdir()
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "convert", f"{tool}.py")
    r = run_with_tmpfs(f"mount -t tmpfs -o {mount_options} tmpfs {mnt} || exit 90\n"
                       f"{sys.executable} {script} {source} {mnt}/out.safetensors; echo \"rc=$?\"; ls -A {mnt}")
    lines = r.stdout.strip().splitlines()
    assert "rc=2" in lines and lines[-1] == "rc=2", r.stdout + r.stderr  # exit 2 and the tmpfs left empty
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert re.search(fragment, errors[0]), errors[0]
    assert _digest(source) == before


def test_half_precision_input_is_written_float32_with_a_note(tmp_path, capsys, t8_sd):
    half = {k: v.half() if v.is_floating_point() else v for k, v in t8_sd.items()}
    ckpt = _ckpt(tmp_path, half)
    rc, out, err = _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors"], capsys)
    assert rc == 0, err
    assert "note: the checkpoint's weights are float16; written as float32" in out
    kernel = load_variables(tmp_path / "out.safetensors")["params"]["head"]["fc"]["kernel"]
    assert kernel.dtype == np.float32
    rc, out, err = _run(torch2flax.main, [ckpt, tmp_path / "half.safetensors", "--dtype", "bfloat16"], capsys)
    assert rc == 0, err
    assert str(load_variables(tmp_path / "half.safetensors")["params"]["head"]["fc"]["kernel"].dtype) == "bfloat16"
    rc, out, err = _run(flax2torch.main, [tmp_path / "half.safetensors", tmp_path / "back.pth", "--dtype", "float16"],
                        capsys)
    assert rc == 0, err
    assert torch.load(tmp_path / "back.pth", weights_only=True)["head.fc.weight"].dtype == torch.float16


def test_directory_and_fifo_inputs_are_named(tmp_path, capsys):
    (tmp_path / "dir.pth").mkdir()
    _bad(tmp_path, capsys, tmp_path / "dir.pth", "is a directory, not a weights file")
    os.mkfifo(tmp_path / "fifo.pth")
    _bad(tmp_path, capsys, tmp_path / "fifo.pth", "is not a regular file (a FIFO, socket or device)")
    rc, _, err = _run(flax2torch.main, [tmp_path / "dir.pth", tmp_path / "out.pth"], capsys)
    _assert_refused(tmp_path, rc, err, "is a directory", output="out.pth")


def test_outputs_follow_the_umask(tmp_path, capsys, t8_sd):
    ckpt = _ckpt(tmp_path, t8_sd)
    old = os.umask(0o027)
    try:
        assert _run(torch2flax.main, [ckpt, tmp_path / "out.safetensors"], capsys)[0] == 0
        assert _run(flax2torch.main, [tmp_path / "out.safetensors", tmp_path / "back.pth"], capsys)[0] == 0
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "out.safetensors").st_mode & 0o777 == 0o640
    assert os.stat(tmp_path / "back.pth").st_mode & 0o777 == 0o640


def test_train_form_round_trip_through_a_torch_safetensors(tmp_path, capsys, t8_sd):
    """flax2torch's .safetensors keeps num_batches_tracked 0-d, so the project reads its own output."""
    from fastvit_jax.loading import load_model

    assert _run(torch2flax.main, [_ckpt(tmp_path, t8_sd), tmp_path / "flax.safetensors"], capsys)[0] == 0
    rc, _, err = _run(flax2torch.main, [tmp_path / "flax.safetensors", tmp_path / "back.safetensors"], capsys)
    assert rc == 0, err
    from safetensors.numpy import load_file

    assert load_file(tmp_path / "back.safetensors")["stem.0.conv_kxk.0.bn.num_batches_tracked"].shape == ()
    model, _ = load_model(tmp_path / "back.safetensors")
    assert model.cfg.name == "t8"
