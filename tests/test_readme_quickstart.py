"""The README's Quick start, run verbatim on a t8 checkpoint in timm's layout and a JPEG."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import torch_ref

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def quickstart_blocks() -> list:
    """(language, code) of each fenced block under '## Quick start'."""
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    section = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    import tensorflow as tf

    d = tmp_path_factory.mktemp("quickstart")
    torch.manual_seed(0)
    model = torch_ref.create_model("t8")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "model.safetensors")
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    (d / "cat.jpg").write_bytes(tf.io.encode_jpeg(image).numpy())
    return d


def _env() -> dict:
    bin_dir = os.path.dirname(sys.executable)  # `python` in the README is this interpreter
    return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=ROOT)


def test_quickstart_has_the_three_blocks():
    assert [lang for lang, _ in quickstart_blocks()] == ["bash", "python", "bash"]


def test_predict_command_verbatim(workdir):
    command = quickstart_blocks()[0][1]
    proc = subprocess.run(["bash", "-ec", command], cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == "cat.jpg" and len(lines) == 6 and lines[1].lstrip().startswith("1.")


def test_python_block_verbatim(workdir):
    code = quickstart_blocks()[1][1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=workdir, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.fullmatch(r"\[\d+\]", proc.stdout.strip())


def test_finetune_command_flags_parse():
    sys.path.insert(0, ROOT)
    import train_tpu

    command = quickstart_blocks()[2][1].replace("\\\n", " ")
    argv = shlex.split(command)
    assert argv[:2] == ["python", "train_tpu.py"]
    args = train_tpu.build_parser().parse_args(argv[2:])
    assert args.init_from == "model.safetensors" and args.dataset == "oxford_flowers102"
