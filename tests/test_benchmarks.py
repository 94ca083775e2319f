"""Smoke test of the benchmark suite at tiny sizes (t8, batch 1, 64 px, 1 repeat).

Checks the structure of the JSON report and of the Markdown tables, never timing values; the report
and the GPU-session script are in the slow tier (make test-slow, run by CI). Also checks that the
two conv lowerings of ``fastvit_jax.conv`` agree on every conv shape FastViT uses (the benchmarks
rely on the CPU-only 'shift' lowering).
"""

import json
import os

import numpy as np
import pytest

from helpers import collectives_in

pytestmark = pytest.mark.xdist_group("benchmarks")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    from benchmarks import run

    tmp = tmp_path_factory.mktemp("bench")
    out = tmp / "report.json"
    args = ["--quick", "--variants", "t8", "--train_variants", "t8", "--batch_sizes", "1", "--image_size", "64",
            "--repeats", "1", "--flops_variants", "t8", "--profile_variants", "t8", "--profile_batch", "1",
            "--pipeline_batch", "2", "--pipeline_chunks", "1", "--pipeline_threads", "1", "--out", str(out),
            # 'native' compiles the train step ~3x faster than the CPU default 'shift' (speed is not tested here)
            "--lowering", "native", "--deploy_batch_sizes", "2",
            "--data_dir", str(tmp / "tfds")]
    rep = run.main(args)
    return rep, json.loads(out.read_text()), run.to_markdown(rep), tmp


@pytest.mark.slow
def test_report_json_structure(report):
    rep, js, _, _ = report
    assert js["mode"] == "quick"
    m = js["machine"]
    for key in ("cpu_model", "cpu_cores", "jax", "torch", "flax", "date", "xla_cpu_threads", "torch_threads"):
        assert key in m, key
    assert set(js["sections"]) == {"flops", "inference", "profile", "train", "pipeline", "deploy"}
    for sec in js["sections"].values():
        assert "load_average" in sec and "wall_s" in sec


@pytest.mark.slow
def test_deploy_runtimes_agree_with_jax(report):
    _, js, md, _ = report
    (row,) = js["sections"]["deploy"]["rows"]
    assert (row["variant"], row["batch"], row["image_size"]) == ("t8", 2, 64)
    assert set(row["deviation_from_jax"]) == {"jax", "onnxruntime", "litert", "torch_nchw", "torch_cl"}
    assert max(row["deviation_from_jax"].values()) <= 1e-4
    assert all(row[f"{r}_ms"] > 0 for r in ("jax", "onnxruntime", "litert", "torch"))
    assert "| t8 | 2 |" in md and "Deploy runtimes" in md


@pytest.mark.slow
def test_inference_rows(report):
    inf = report[1]["sections"]["inference"]
    impls = {(r["impl"], r["form"]) for r in inf["rows"]}
    assert impls >= {(i, f) for i in ("jax", "torch_nchw", "torch_cl") for f in ("fused", "unfused")}
    for r in inf["rows"]:
        assert r["img_s"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        if r["impl"] == "jax":
            assert r["compile_s"] > 0
            assert r["max_rel_err_vs_torch"] < 1e-3  # same weights in both frameworks
    fused = [s for s in inf["summary"] if s["form"] == "fused"]
    assert fused and all("fused_speedup_jax" in s and "jax_over_torch" in s for s in fused)


@pytest.mark.slow
def test_train_rows(report):
    tr = report[1]["sections"]["train"]
    (s,) = tr["summary"]
    assert s["jax_img_s"] > 0 and s["jax_compile_s"] > 0
    losses = s["first_step_loss"]
    # same weights, same batch: the first-step losses agree across frameworks
    assert max(losses.values()) - min(losses.values()) < 1e-3 * max(1.0, abs(losses["jax"]))
    jax_row = next(r for r in tr["rows"] if r["impl"] == "jax")
    assert "peak_rss_mib" in jax_row["memory"] and "xla_temp_mib" in jax_row["memory"]


@pytest.mark.slow
def test_flops_and_pipeline_rows(report):
    js = report[1]
    (f,) = js["sections"]["flops"]["rows"]
    assert f["params_unfused"] == f["official_params_unfused"] and f["params_fused"] == f["official_params_fused"]
    assert f["xla_gmacs_fused"] > 0 and f["conv_dot_gmacs_fused"] > 0
    pipe = js["sections"]["pipeline"]
    assert {r["threads"] for r in pipe["rows"]} >= {1}
    assert all(r["per_core_img_s"] > 0 for r in pipe["rows"])
    assert any(n["variant"] == "t8" and n["cores"] > 0 for n in pipe["cores_needed"])


@pytest.mark.slow
def test_markdown_tables(report):
    md = report[2]
    for title in ("Inference", "Training step", "Per-block profile", "Input pipeline", "Params / GMACs"):
        assert f"#### {title}" in md
    tables = [ln for ln in md.splitlines() if ln.startswith("|")]
    assert len(tables) > 10
    # every table row has as many cells as its header
    block = []
    for ln in md.splitlines() + [""]:
        if ln.startswith("|"):
            block.append(ln.count("|"))
        elif block:
            assert len(set(block)) == 1, block
            block = []


@pytest.mark.slow
def test_charts_beside_the_json(report):
    pngs = sorted(p for p in os.listdir(report[3]) if p.endswith(".png"))
    assert pngs == ["report-inference.png", "report-profile.png", "report-train.png"]


def _synthetic_report():
    machine = {"cpu_model": "Test CPU", "cpu_cores": 2, "jax_backend": "cpu", "jax_devices": ["cpu"],
               "date": "2026-01-02T03:04:05+00:00", "git_commit": "abc1234"}
    inference = [{"variant": v, "batch": 8, "image_size": 256, "form": f, "jax_img_s": 100.0 * k,
                  "torch_nchw_img_s": 80.0 * k, "torch_cl_img_s": 120.0 * k, "torch_compile_img_s": None}
                 for k, (v, f) in enumerate([("t8", "fused"), ("t8", "unfused"), ("sa12", "fused")], 1)]
    train = [{"variant": "t8", "batch": 8, "image_size": 256, "jax_img_s": 20.0, "torch_nchw_img_s": 12.0,
              "torch_cl_img_s": None}]
    pieces = ("stem", "stage 0", "stage 1", "stage 2", "stage 3", "final_conv + head", "whole network")
    profile = [{"variant": "t8", "batch": 8, "piece": p, "impl": i, "median_ms": 1.0 + n + m}
               for n, p in enumerate(pieces) for m, i in enumerate(("jax", "torch_nchw", "torch_cl"))]
    return {"mode": "quick", "config": {"image_size": 256}, "machine": machine,
            "sections": {"inference": {"summary": inference}, "train": {"summary": train},
                         "profile": {"rows": profile}, "flops": {"rows": []}}}


def test_plots_on_a_synthetic_report(tmp_path):
    from benchmarks import plots

    rep = _synthetic_report()
    paths = plots.write_charts(rep, str(tmp_path), "x")
    assert [os.path.basename(p) for p in paths] == ["x-inference.png", "x-train.png", "x-profile.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for make in (plots.inference_figure, plots.train_figure, plots.profile_figure):
        fig = make(rep)
        title = fig._suptitle.get_text() if fig._suptitle else fig.axes[0].get_title()
        assert "Test CPU, 2 cores" in title and "2026-01-02" in title and "abc1234" in title
        assert fig.legends and len(fig.legends[0].get_texts()) >= 2  # one legend, all implementations
        for ax in fig.axes:
            assert ax.get_xlabel() and ("per second" in ax.get_ylabel() or "milliseconds" in ax.get_ylabel())
        plots.plt.close(fig)
    # no torch.compile column when it was not timed; a section missing from the report gets no chart
    assert "torch.compile" not in [t.get_text() for t in plots.inference_figure(rep).legends[0].get_texts()]
    del rep["sections"]["profile"]
    assert len(plots.write_charts(rep, str(tmp_path), "y")) == 2


def test_plots_cli_merges_reports(tmp_path):
    from benchmarks import plots

    a, b = _synthetic_report(), _synthetic_report()
    for r in b["sections"]["inference"]["summary"]:
        r["batch"] = 32
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "b.json").write_text(json.dumps(b))
    paths = plots.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), str(tmp_path / "out"), "--prefix", "m"])
    assert os.path.basename(paths[0]) == "m-inference.png"
    merged = plots.merge_reports([a, b])
    assert len(merged["sections"]["inference"]["summary"]) == 6
    assert len(plots.inference_figure(merged).axes) == 2  # one panel per batch


def test_conv_macs_match_official_t8():
    import jax
    import jax.numpy as jnp

    import fastvit_jax
    from benchmarks.flops import jaxpr_macs
    from fastvit_variants import OFFICIAL_GMACS

    for fused, official in ((False, OFFICIAL_GMACS["t8"][0]), (True, OFFICIAL_GMACS["t8"][1])):
        model = fastvit_jax.create_model("t8", inference_mode=fused, lowering="native")
        shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
        x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
        gmacs = jaxpr_macs(lambda v, xx: model.apply(v, xx), shapes, x) / 1e9
        assert abs(gmacs - official) < 0.0015, (fused, gmacs, official)


# (x shape, kernel shape, stride, padding, groups): every conv in FastViT, at small spatial sizes
CONV_CASES = [
    ((2, 16, 16, 3), (3, 3, 3, 8), 2, 1, 1),      # stem dense 3x3 s2
    ((2, 16, 16, 3), (1, 1, 3, 8), 2, 0, 1),      # stem conv_scale 1x1 s2
    ((2, 9, 7, 3), (3, 3, 3, 8), 2, 1, 1),        # stem dense 3x3 s2, odd sizes
    ((2, 9, 7, 8), (1, 1, 8, 8), 2, 0, 1),        # 1x1 s2, odd sizes
    ((2, 16, 16, 8), (3, 3, 1, 8), 2, 1, 8),      # stem dw 3x3 s2
    ((2, 9, 7, 8), (3, 3, 1, 8), 2, 1, 8),        # stem dw 3x3 s2, odd sizes
    ((2, 9, 7, 8), (1, 1, 1, 8), 2, 0, 8),        # stem dw block's 1x1 s2 scale branch (phases without taps)
    ((2, 8, 8, 8), (3, 3, 1, 8), 1, 0, 8),        # dw 3x3 without padding
    ((2, 8, 8, 8), (1, 1, 8, 8), 1, 0, 1),        # 1x1
    ((2, 8, 8, 8), (3, 3, 1, 8), 1, 1, 8),        # RepMixer dw 3x3
    ((2, 8, 8, 8), (7, 7, 1, 8), 1, 3, 8),        # ConvMlp / RepCPE dw 7x7
    ((2, 8, 8, 8), (7, 7, 1, 16), 2, 3, 8),       # PatchEmbed dw 7x7 s2, channel multiplier 2
    ((2, 8, 8, 8), (3, 3, 1, 16), 2, 1, 8),       # PatchEmbed small 3x3 s2, multiplier 2
    ((2, 9, 7, 8), (7, 7, 1, 16), 2, 3, 8),       # odd sizes
    ((2, 4, 4, 8), (3, 3, 1, 16), 1, 1, 8),       # final_conv dw 3x3, multiplier 2
    ((2, 4, 4, 8), (1, 1, 8, 2), 1, 0, 1),        # SE fc
]


@pytest.mark.parametrize("xs,ks,stride,padding,groups", CONV_CASES)
def test_conv_lowerings_agree(xs, ks, stride, padding, groups):
    import jax
    import jax.numpy as jnp

    from fastvit_jax.conv import conv2d

    rs = np.random.RandomState(0)
    x = jnp.asarray(rs.randn(*xs).astype(np.float32))
    k = jnp.asarray(rs.randn(*ks).astype(np.float32))
    def f(low):
        return np.asarray(jax.jit(lambda a, b: conv2d(a, b, stride=stride, padding=padding, groups=groups,
                                                      lowering=low))(x, k))

    a, b = f("native"), f("shift")
    assert a.shape == b.shape
    np.testing.assert_allclose(b, a, atol=1e-5 * max(1.0, float(np.abs(a).max())), rtol=0)


@pytest.mark.parametrize("xs,ks,stride,padding,groups", CONV_CASES)
def test_conv_lowering_gradients_agree(xs, ks, stride, padding, groups):
    """The shift lowering's hand-written VJPs (depthwise/multiplier, 1x1, small dense) match
    autodiff of the native conv, for the input and the kernel."""
    import jax
    import jax.numpy as jnp

    from fastvit_jax.conv import conv2d

    rs = np.random.RandomState(1)
    x = jnp.asarray(rs.randn(*xs).astype(np.float32))
    k = jnp.asarray(rs.randn(*ks).astype(np.float32))
    out_shape = jax.eval_shape(lambda a, b: conv2d(a, b, stride=stride, padding=padding, groups=groups,
                                                   lowering="native"), x, k).shape
    w = jnp.asarray(rs.randn(*out_shape).astype(np.float32))

    def grads(low):
        f = lambda a, b: jnp.sum(conv2d(a, b, stride=stride, padding=padding, groups=groups, lowering=low) * w)
        return [np.asarray(t) for t in jax.jit(jax.grad(f, argnums=(0, 1)))(x, k)]

    for a, b in zip(grads("native"), grads("shift")):
        np.testing.assert_allclose(b, a, atol=1e-4 * max(1.0, float(np.abs(a).max())), rtol=0)


@pytest.mark.parametrize("xs,ks,stride,padding,groups", [
    ((16, 12, 12, 8), (7, 7, 1, 8), 1, 3, 8),     # ConvMlp dw 7x7
    ((16, 12, 12, 8), (3, 3, 1, 16), 2, 1, 8),    # PatchEmbed 3x3 s2, multiplier 2
    ((16, 12, 12, 8), (1, 1, 8, 8), 2, 0, 1),     # 1x1 s2
    ((16, 12, 12, 3), (3, 3, 3, 8), 2, 1, 1),     # stem dense
])
def test_shift_lowering_gradients_stay_local_under_batch_sharding(xs, ks, stride, padding, groups):
    """With the batch sharded over 8 devices, the hand-written VJPs move no activations between
    devices: the compiled gradient has no all-gather / all-to-all / collective-permute, only the
    all-reduce of the kernel gradient. (A fold across the batch once cost 10x per step.)"""
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from fastvit_jax.conv import conv2d

    mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
    rs = np.random.RandomState(2)
    x = jax.device_put(jnp.asarray(rs.randn(*xs).astype(np.float32)), NamedSharding(mesh, P("data")))
    k = jax.device_put(jnp.asarray(rs.randn(*ks).astype(np.float32)), NamedSharding(mesh, P()))
    f = lambda a, b: jnp.sum(jnp.tanh(conv2d(a, b, stride=stride, padding=padding, groups=groups, lowering="shift")))
    hlo = jax.jit(jax.grad(f, argnums=(0, 1))).lower(x, k).compile().as_text()
    assert collectives_in(hlo) <= {"all-reduce"}
    assert "all-reduce" in hlo


def test_trace_scopes_name_module_and_direction():
    from benchmarks.trace import scope_of

    fwd = "jit(step)/jvp(FastVit)/FastVit.forward_features/stages_0/blocks_1/mlp/fc1/bhwi,io->bhwo/dot_general"
    assert scope_of(fwd) == "fwd stages_0/blocks_1/mlp"
    assert scope_of(fwd.replace("jvp(FastVit)", "transpose(jvp(FastVit))")) == "bwd stages_0/blocks_1/mlp"
    assert scope_of("jit(f)/stem_0/reparam_conv/conv_general_dilated") == "fwd stem_0/reparam_conv"
    assert scope_of("jit(step)/optax/adamw/mul").startswith("fwd (outside the model")


def test_trace_of_a_tiny_forward(tmp_path):
    """The profiler trace is read back and its events matched to the executable's HLO ops."""
    from benchmarks import trace

    r = trace.run_trace("forward", "t8", batch=1, image_size=64, fused=True, steps=2, trace_dir=str(tmp_path))
    assert r["op_ms_per_call"] > 0 and r["ops"] and all(o["ms"] >= 0 for o in r["ops"])
    assert abs(sum(s["share"] for s in r["scopes"]) - 1.0) < 0.2  # top scopes cover most of the time
    assert any(s["scope"].startswith("fwd stages_0") for s in r["scopes"])
    assert "| HLO op |" in trace.markdown(r)


def test_baseline_numerics_trace_the_old_step_and_restore_the_new():
    """benchmarks/baseline_numerics.py: inside the block a bf16 conv asks for a float32 result and
    BatchNorm takes two passes; after it, today's functions are back (and agree in value)."""
    import jax
    import jax.numpy as jnp

    import fastvit_jax.conv
    import fastvit_jax.layers
    from benchmarks.baseline_numerics import baseline_numerics
    from fastvit_jax.layers import ConvNorm
    from fastvit_jax.policy import ComputePolicy, compute_policy

    module = ConvNorm(8, 3)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 8, 8, 4))
    variables = module.init(jax.random.PRNGKey(1), x, train=False)

    def conv_results(text):
        return [line.rsplit("->", 1)[-1] for line in text.splitlines() if "stablehlo.convolution" in line]

    def lowered_text():  # a fresh function each time: jit's trace cache must not hand back the other form
        with compute_policy(ComputePolicy(jnp.bfloat16, "native")):
            return jax.jit(lambda v, x: module.apply(v, x, train=True, mutable=["batch_stats"])).lower(
                variables, x).as_text()

    now = (fastvit_jax.conv.conv2d_native, fastvit_jax.layers.batch_moments,
           fastvit_jax.conv.conv2d_depthwise_multiplier)
    with baseline_numerics():
        assert fastvit_jax.conv.conv2d_depthwise_multiplier is not now[2]
        before = lowered_text()
        assert fastvit_jax.layers.batch_moments is not now[1]
        mean2, var2 = fastvit_jax.layers.batch_moments(x)
    assert (fastvit_jax.conv.conv2d_native, fastvit_jax.layers.batch_moments,
            fastvit_jax.conv.conv2d_depthwise_multiplier) == now
    after = lowered_text()
    assert all("xf32>" in r for r in conv_results(before)) and conv_results(before)
    assert all("xbf16>" in r for r in conv_results(after)) and conv_results(after)
    mean1, var1 = fastvit_jax.layers.batch_moments(x)
    np.testing.assert_allclose(mean1, mean2, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(var1, var2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_gpu_session_script_runs_tiny_on_cpu(tmp_path):
    """benchmarks/gpu_session.sh --tiny: the GPU session's steps, small, on this CPU (the train grid
    with its profile, and inference); checks what they write, not the speed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "gpu"
    r = subprocess.run(["bash", os.path.join(root, "benchmarks", "gpu_session.sh"), "--tiny"], cwd=root,
                       env={**os.environ, "OUT": str(out), "PYTHON": sys.executable}, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "exit 0" in r.stdout and "exit 124" not in r.stdout, r.stdout[-3000:]
    grid = json.loads((out / "train_t8.json").read_text())
    assert grid["tiny"] and grid["errors"] == [] and len(grid["rows"]) == 1
    row = grid["rows"][0]
    for impl in ("jax_before", "jax_after", "torch_eager"):
        assert row[impl]["img_s"] > 0 and np.isfinite(row["first_step_loss"][impl])
    # same weights and batch: the three first-step losses agree (float32 on CPU)
    losses = list(row["first_step_loss"].values())
    assert max(losses) - min(losses) < 1e-3 * abs(losses[0]), row["first_step_loss"]
    assert row["jax_before"]["remat"] == "none" and row["jax_after"]["remat"] == "none"  # auto on CPU: none
    assert grid["profile"]["ops"] and (out / "trace_t8_train.json.gz").stat().st_size == grid["profile"]["trace_bytes"]
    inference = json.loads((out / "inference.json").read_text())
    assert inference["sections"]["inference"]["rows"]
    report = (out / "report.md").read_text()
    assert "## train_t8" in report and "JAX before img/s" in report and "## inference" in report
