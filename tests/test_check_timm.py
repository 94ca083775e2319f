"""convert/check_timm.py: the timm cross-check's own checks can fail.

timm is not installed here (it needs torchvision, which does not work beside the pinned CPU
torch), so these tests stand a fake ``timm`` module in for it: one that builds torch_ref
models passes every check; one with different keys, or with different arithmetic (tanh GELU),
fails the right check. The real run (timm 1.0.31, all seven variants) is recorded in
benchmarks/results/timm-1.0.31-check.json.
"""

import sys
import types

from torch import nn

import torch_ref
from convert import check_timm


def _fake_timm(monkeypatch, build):
    mod = types.ModuleType("timm")
    mod.__version__ = "fake"
    mod.create_model = lambda name, pretrained=False, num_classes=1000: build(name.removeprefix("fastvit_"),
                                                                               num_classes)
    monkeypatch.setitem(sys.modules, "timm", mod)


def test_passes_when_timm_builds_the_same_model(monkeypatch):
    _fake_timm(monkeypatch, lambda v, n: torch_ref.create_model(v, num_classes=n))
    r = check_timm.check_variant("t8", image_size=64)
    assert r["checks"] == {"train_keys_match": True, "fused_keys_match": True, "logits_within_tolerance": True}
    assert set(r["rel_err"]) == {
        "torch_ref_vs_timm_unfused", "torch_ref_loads_timm_fused", "timm_fused_vs_timm_unfused",
        "torch_ref_fused_vs_timm_fused", "jax_unfused_from_timm_vs_timm", "jax_fused_on_jax_side_vs_timm",
        "jax_from_timm_fused_vs_timm"}
    assert max(r["rel_err"].values()) < 1e-5


def test_fails_on_other_keys(monkeypatch):
    _fake_timm(monkeypatch, lambda v, n: torch_ref.create_model("t12", num_classes=n))
    r = check_timm.check_variant("t8", image_size=64)
    assert r["checks"] == {"train_keys_match": False}
    assert r["train_key_diff"]["only_in_timm"]  # t12 has more blocks in its stages


def test_fails_on_other_arithmetic(monkeypatch):
    def tanh_gelu_model(v, n):
        m = torch_ref.create_model(v, num_classes=n)
        for parent in list(m.modules()):
            for name, child in parent.named_children():
                if isinstance(child, nn.GELU):
                    setattr(parent, name, nn.GELU(approximate="tanh"))
        return m

    _fake_timm(monkeypatch, tanh_gelu_model)
    r = check_timm.check_variant("t8", image_size=64)
    assert r["checks"]["train_keys_match"] and r["checks"]["fused_keys_match"]
    assert not r["checks"]["logits_within_tolerance"]
    assert r["rel_err"]["torch_ref_vs_timm_unfused"] > check_timm.TOLERANCE


def test_run_reports_a_failing_variant_and_goes_on(monkeypatch):
    def build(v, n):
        if v == "t8":
            raise RuntimeError("no such model")
        return torch_ref.create_model(v, num_classes=n)

    _fake_timm(monkeypatch, build)
    rep = check_timm.run(["t8"], image_size=64)
    assert not rep["ok"] and "no such model" in rep["variants"][0]["error"]


def test_without_timm_it_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # `import timm` raises ImportError
    assert check_timm.main(["--variants", "t8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: convert.check_timm compares with an installed timm") and err.count("\n") == 1
