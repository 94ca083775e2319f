"""Entry points load TensorFlow without its native start-up lines; FASTVIT_DEBUG keeps them."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOAD = "from fastvit_jax.quiet import quiet_native_logs; quiet_native_logs(); import tensorflow, jax; jax.devices()"


def _stderr(debug: bool) -> str:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "FASTVIT_DEBUG")}
    env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **({"FASTVIT_DEBUG": "1"} if debug else {}))
    proc = subprocess.run([sys.executable, "-c", LOAD], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def test_tensorflow_loads_without_start_up_lines():
    assert _stderr(debug=False) == ""


@pytest.mark.parametrize("entry_point", ["train_tpu.py", "fastvit_jax/predict.py", "fastvit_jax/export.py",
                                         "fastvit_jax/demo.py"])
def test_every_entry_point_quiets_before_its_work(entry_point):
    with open(os.path.join(REPO, entry_point)) as f:
        assert "quiet_native_logs()" in f.read()
