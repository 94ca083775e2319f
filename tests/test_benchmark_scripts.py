"""The benchmark suite end to end at a toy size (t8, batch 1, 64 px, one repeat), so that
`make bench` and benchmarks/gpu_session.sh keep working: every section runs, the report
renders, and the frameworks agree on what they timed (same logits, same first-step loss)."""

import numpy as np

from benchmarks import run as bench_run


def test_all_sections_at_toy_size(tmp_path):
    args = bench_run.parse_args([
        "--only", "flops", "inference", "profile", "train", "--variants", "t8", "--flops_variants", "t8",
        "--train_variants", "t8", "--profile_variants", "t8", "--batch_sizes", "1", "--profile_batch", "1",
        "--image_size", "64", "--repeats", "1", "--out", str(tmp_path / "r.json")])
    report = bench_run.run(args)
    secs = report["sections"]
    assert set(secs) == {"flops", "inference", "profile", "train"}

    inf = {(r["impl"], r["form"]): r for r in secs["inference"]["rows"]}
    assert {("jax", "fused"), ("jax", "unfused"), ("torch_nchw", "fused"), ("torch_cl", "unfused")} <= set(inf)
    for form in ("fused", "unfused"):
        assert inf[("jax", form)]["max_rel_err_vs_torch"] < 1e-4
    assert all(r["img_s"] > 0 for r in inf.values())

    (tr,) = secs["train"]["summary"]
    losses = list(tr["first_step_loss"].values())
    assert np.allclose(losses, losses[0], rtol=1e-4), tr["first_step_loss"]

    pieces = {r["piece"] for r in secs["profile"]["rows"]}
    assert {"stem", "stage 0", "stage 3", "final_conv + head", "whole network"} <= pieces
    flops = secs["flops"]["rows"][0]
    assert flops["params_unfused"] == flops["official_params_unfused"]

    md = bench_run.to_markdown(report)
    for title in ("Inference", "Training step", "Per-block profile", "Params / GMACs"):
        assert title in md
