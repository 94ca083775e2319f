"""Inference throughput: JAX (jax.jit) vs torch_ref (eager NCHW, eager channels_last, torch.compile).

Both frameworks run the *same weights*: a torch_ref model made non-trivial
(``torch_ref.testing.make_nontrivial``), fused with ``torch_ref.reparameterize_model``, and both
forms converted with ``fastvit_jax.weights.keys.torch_to_flax``. All implementations of one
(variant, batch) are timed round-robin in this process (see ``benchmarks.common``).

On CPU JAX runs float32 with the backend's default conv lowering ('shift', see
``fastvit_jax.conv``); on accelerators JAX runs bfloat16 compute and PyTorch runs CUDA autocast
bfloat16. PyTorch uses as many threads as XLA's intra-op pool (all visible cores).

    python -m benchmarks.inference --variants t8 sa12 --batch_sizes 8 --image_size 256
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks import common
from fastvit_jax.compare import relative_error

IMPLS_EAGER = ("torch_nchw", "torch_cl")


def nn_gelu(x):
    """``jax.nn.gelu(approximate=False)``: the exact GELU through erfc, which XLA:CPU expands into a
    much slower sequence (3-4x) than ``fastvit_jax.layers.gelu``'s erf form (same values to ~1e-6).
    Timed as an experiment to show what the erf form buys."""
    import jax

    return jax.nn.gelu(x, approximate=False)


# Extra JAX configurations timed beside the default one (fused form only, same round-robin);
# the headline ratio always uses the default. compiler_options are XLA debug options applied to
# that one compilation (same effect as XLA_FLAGS for the process).
# "backends": where the experiment runs (None = everywhere).
JAX_EXPERIMENTS = {
    "jax+vw512": {"compiler_options": {"xla_cpu_prefer_vector_width": 512}, "backends": ("cpu",)},
    "jax+nn_gelu": {"gelu": "nn", "backends": None},
    "jax+2chains": {"chains": 2, "backends": ("cpu",)},
    # the lowering not chosen by default: is 'native' (cuDNN / the TPU conv unit) really the faster there?
    "jax+shift": {"lowering": "shift", "backends": ("gpu", "tpu")},
    "jax+float32": {"dtype": "float32", "backends": ("gpu", "tpu")},
}


EXPERIMENT_NOTES = {
    "jax+vw512": "XLA option xla_cpu_prefer_vector_width=512 (AVX-512 codegen for the fused loops)",
    "jax+nn_gelu": "fastvit_jax.layers.gelu (0.5·x·(1+erf(x/√2))) replaced by jax.nn.gelu(approximate=False), the "
                   "same function through erfc, which XLA:CPU expands into several costlier fusions",
    "jax+2chains": "the batch as two independent halves in one jitted call: XLA:CPU runs their ops side by side, "
                   "so single-threaded ops (YNNPACK's stem conv) keep both cores busy",
    "jax+shift": "depthwise/grouped convs as shifted multiply-adds instead of the native conv",
    "jax+float32": "float32 compute instead of bfloat16",
}


def build_jax_forward(variant: str, variables: Dict[str, Any], *, fused: bool, batch: int, image_size: int,
                      lowering: Optional[str] = None, dtype=None, compiler_options: Optional[Dict] = None,
                      gelu: Optional[str] = None, chains: int = 1):
    """(compiled forward, input, seconds to lower+compile).

    ``chains`` > 1: the batch as that many independent slices through the network in one jitted
    call (outputs concatenated), so that XLA can run their ops side by side."""
    import jax
    import jax.numpy as jnp

    import fastvit_jax
    from fastvit_jax import layers

    dtype = dtype or common.jax_compute_dtype()
    num_classes = variables["params"]["head"]["fc"]["bias"].shape[0]  # the head of the weights (1000 here)
    model = fastvit_jax.create_model(variant, num_classes=num_classes, inference_mode=fused, dtype=dtype,
                                     lowering=lowering)
    x = jnp.asarray(np.random.RandomState(1).randn(batch, image_size, image_size, 3).astype(np.float32))
    if batch % chains:
        raise ValueError(f"batch {batch} is not divisible into {chains} chains")

    def apply(v, xx):
        if chains == 1:
            return model.apply(v, xx, train=False)
        return jnp.concatenate([model.apply(v, part, train=False) for part in jnp.split(xx, chains)])

    fwd = jax.jit(apply)
    original_gelu = layers.gelu
    t0 = time.perf_counter()
    try:
        if gelu == "nn":
            layers.gelu = nn_gelu  # read at trace time by every block
        compiled = fwd.lower(variables, x).compile(compiler_options=compiler_options or None)
    finally:
        layers.gelu = original_gelu
    compile_s = time.perf_counter() - t0
    return compiled, x, compile_s


def _torch_forward(module, x):
    return lambda: common.torch_infer(module, x)


def try_torch_compile(module, x, budget_s: float) -> Dict[str, Any]:
    """torch.compile(module) and one call; {'fn'|'error', 'compile_s'}. Never raises."""
    import torch

    t0 = time.perf_counter()
    try:
        cm = torch.compile(module)
        run = _torch_forward(cm, x)
        run()
        dt = time.perf_counter() - t0
        if dt > budget_s:
            return {"error": f"compiled in {dt:.0f}s > budget {budget_s:.0f}s (not timed)", "compile_s": dt}
        return {"fn": run, "compile_s": dt}
    except Exception as e:  # noqa: BLE001 - record why it failed
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                "compile_s": time.perf_counter() - t0}


def run_inference(variants: Sequence[str] = ("t8",), batch_sizes: Sequence[int] = (8,), image_size: int = 256,
                  repeats: int = 10, warmup: int = 2, forms: Sequence[str] = ("fused", "unfused"),
                  torch_compile: bool = False, torch_compile_budget_s: float = 600.0,
                  lowering: Optional[str] = None, min_time_s: float = 0.0, flops_per_image: Optional[Dict] = None,
                  peak_tflops: Optional[float] = None, check: bool = True,
                  experiments: Sequence[str] = ()) -> Dict[str, Any]:
    """Time every (variant, batch, form, impl); returns {'rows': [...], 'summary': [...], 'notes': [...]}.

    ``flops_per_image``: {(variant, form): GFLOP per image} (from ``benchmarks.flops``) for MFU.
    """
    import torch

    common.setup_torch_threads()
    device = common.torch_device()
    jdtype = common.jax_compute_dtype()
    peak, peak_src = common.accelerator_peak_tflops(peak_tflops)
    rows: List[Dict[str, Any]] = []
    summary: List[Dict[str, Any]] = []
    notes: List[str] = []
    for variant in variants:
        tm_unfused = common.torch_model(variant)
        tm_fused = __import__("torch_ref").reparameterize_model(tm_unfused)
        torch_models = {"fused": tm_fused, "unfused": tm_unfused}
        jax_vars = {f: common.flax_variables_from_torch(torch_models[f]) for f in forms}
        for batch in batch_sizes:
            fns: Dict[str, Any] = {}
            meta: Dict[str, Dict[str, Any]] = {}
            for form in forms:
                compiled, xj, compile_s = build_jax_forward(variant, jax_vars[form], fused=form == "fused",
                                                            batch=batch, image_size=image_size, lowering=lowering)
                v = jax_vars[form]
                fns[f"jax/{form}"] = (lambda c=compiled, v=v, xj=xj: c(v, xj).block_until_ready())
                meta[f"jax/{form}"] = {"compile_s": compile_s, "dtype": np.dtype(jdtype).name}
                xnp = np.asarray(xj)
                m = torch_models[form].to(device)
                x_nchw = torch.from_numpy(xnp.transpose(0, 3, 1, 2).copy()).to(device)
                fns[f"torch_nchw/{form}"] = _torch_forward(m, x_nchw)
                m_cl = __import__("copy").deepcopy(m).to(memory_format=torch.channels_last)
                x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
                fns[f"torch_cl/{form}"] = _torch_forward(m_cl, x_cl)
                tdt = "bfloat16 (autocast)" if device.type == "cuda" else "float32"
                meta[f"torch_nchw/{form}"] = {"dtype": tdt}
                meta[f"torch_cl/{form}"] = {"dtype": tdt}
                if check:
                    yj = np.asarray(compiled(v, xj), np.float64)
                    yt = fns[f"torch_cl/{form}"]().float().cpu().numpy().astype(np.float64)
                    meta[f"jax/{form}"]["max_rel_err_vs_torch"] = relative_error(yj, yt)
                if form == "fused":
                    import jax

                    for name in experiments:
                        exp = JAX_EXPERIMENTS[name]
                        if exp["backends"] is not None and jax.default_backend() not in exp["backends"]:
                            continue
                        if batch % exp.get("chains", 1):
                            continue
                        c2, _, cs2 = build_jax_forward(
                            variant, v, fused=True, batch=batch, image_size=image_size,
                            lowering=exp.get("lowering", lowering), compiler_options=exp.get("compiler_options"),
                            gelu=exp.get("gelu"), dtype=np.dtype(exp["dtype"]) if "dtype" in exp else None,
                            chains=exp.get("chains", 1))
                        fns[f"{name}/{form}"] = (lambda c=c2, v=v, xj=xj: c(v, xj).block_until_ready())
                        yd = np.asarray(c2(v, xj), np.float64)
                        meta[f"{name}/{form}"] = {"compile_s": cs2, "experiment": {
                            k: val for k, val in exp.items() if k != "backends"},
                            "max_abs_diff_vs_jax": float(np.abs(yd - np.asarray(compiled(v, xj), np.float64)).max())}
                if torch_compile and form == "fused":
                    res = try_torch_compile(m_cl, x_cl, torch_compile_budget_s)
                    if "fn" in res:
                        fns[f"torch_compile/{form}"] = res["fn"]
                        meta[f"torch_compile/{form}"] = {"compile_s": res["compile_s"], "dtype": tdt,
                                                         "layout": "channels_last"}
                    else:
                        notes.append(f"torch.compile {variant} b{batch}: {res['error']}")
                        common.log(notes[-1])
            common.log(f"[inference] {variant} b{batch} {image_size}px: timing {len(fns)} implementations x {repeats}")
            times = common.interleaved_timings(fns, repeats=repeats, warmup=warmup, min_time_s=min_time_s)
            for key, ts in times.items():
                impl, form = key.split("/")
                s = common.summarize(ts, items=batch)
                row = {"variant": variant, "batch": batch, "image_size": image_size, "form": form, "impl": impl,
                       "img_s": s["per_s"], "img_s_min": s["per_s_min"], "img_s_max": s["per_s_max"], **s,
                       **meta.get(key, {})}
                if impl == "jax":
                    row["lowering"] = lowering or __import__("fastvit_jax.conv", fromlist=["x"]).default_lowering()
                gfl = (flops_per_image or {}).get((variant, form))
                if gfl and peak:
                    row["mfu"] = gfl * 1e9 * s["per_s"] / (peak * 1e12)
                rows.append(row)
            by = {(r["impl"], r["form"]): r for r in rows if r["variant"] == variant and r["batch"] == batch}
            for form in forms:
                best_eager = max((by[(i, form)] for i in IMPLS_EAGER), key=lambda r: r["img_s"])
                j = by[("jax", form)]
                summary.append({
                    "variant": variant, "batch": batch, "image_size": image_size, "form": form,
                    "jax_img_s": j["img_s"], "torch_nchw_img_s": by[("torch_nchw", form)]["img_s"],
                    "torch_cl_img_s": by[("torch_cl", form)]["img_s"],
                    "torch_compile_img_s": by.get(("torch_compile", form), {}).get("img_s"),
                    "best_torch_eager": best_eager["impl"],
                    "jax_over_torch": j["img_s"] / best_eager["img_s"],
                    # ratio of the fastest calls: closer to a quiet machine's ratio when the box is shared
                    "jax_over_torch_fastest": j["img_s_max"] / max(by[(i, form)]["img_s_max"] for i in IMPLS_EAGER),
                    "jax_compile_s": j.get("compile_s"),
                    "experiments": {k[0]: {"img_s": r["img_s"], "over_jax": r["img_s"] / j["img_s"],
                                           "over_best_torch_eager": r["img_s"] / best_eager["img_s"]}
                                    for k, r in by.items() if k[0].startswith("jax+") and k[1] == form},
                })
            if "fused" in forms and "unfused" in forms:
                for impl in ("jax",) + IMPLS_EAGER:
                    sp = by[(impl, "fused")]["img_s"] / by[(impl, "unfused")]["img_s"]
                    for srow in summary:
                        if srow["variant"] == variant and srow["batch"] == batch and srow["form"] == "fused":
                            srow[f"fused_speedup_{impl}"] = sp
    if peak:
        notes.append(f"MFU against {peak:.0f} TFLOP/s ({peak_src}); FLOPs = 2 x conv+dot MACs (jaxpr)")
    return {"rows": rows, "summary": summary, "notes": notes,
            "settings": {"repeats": repeats, "warmup": warmup, "image_size": image_size, "torch_device": str(device),
                         "jax_dtype": np.dtype(jdtype).name,
                         "torch_threads": torch.get_num_threads()}}


def markdown(result: Dict[str, Any]) -> str:
    rows = []
    for s in result["summary"]:
        spread = {}
        for r in result["rows"]:
            if (r["variant"], r["batch"], r["form"]) == (s["variant"], s["batch"], s["form"]):
                spread[r["impl"]] = f"{r['img_s']:.1f} ({r['img_s_min']:.0f}–{r['img_s_max']:.0f})"
        rows.append([s["variant"], s["batch"], s["form"], spread.get("jax"), spread.get("torch_nchw"),
                     spread.get("torch_cl"), spread.get("torch_compile", "–"),
                     f"**{s['jax_over_torch']:.2f}×** ({s['jax_over_torch_fastest']:.2f}×)",
                     " / ".join(f"{s.get(f'fused_speedup_{i}', float('nan')):.2f}" for i in ("jax",) + IMPLS_EAGER)
                     if s["form"] == "fused" else "", s["jax_compile_s"]])
    head = ["variant", "batch", "form", "JAX img/s (min–max)", "torch NCHW", "torch channels_last", "torch.compile",
            "JAX / best torch eager: medians (fastest calls)", "fused÷unfused (JAX / NCHW / CL)", "JAX compile s"]
    out = common.markdown_table(head, rows)
    exp_rows = []
    for s in result["summary"]:
        for name, e in (s.get("experiments") or {}).items():
            exp_rows.append([s["variant"], s["batch"], s["form"], name, f"{e['img_s']:.1f}", f"{e['over_jax']:.2f}×",
                             f"{e['over_best_torch_eager']:.2f}×"])
    if exp_rows:
        out += "\n\nJAX experiments in the same round-robin (not the default configuration):\n\n" + \
            common.markdown_table(["variant", "batch", "form", "configuration", "img/s", "vs default JAX",
                                   "vs best torch eager"], exp_rows)
        shown = {row[3] for row in exp_rows}
        out += "\n\n" + "\n".join(f"- {name}: {text}" for name, text in EXPERIMENT_NOTES.items() if name in shown)
    if result.get("notes"):
        out += "\n\n" + "\n".join(f"- {n}" for n in result["notes"])
    return out


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[8])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--torch_compile", action="store_true")
    p.add_argument("--lowering", choices=["native", "shift"], default=None)
    p.add_argument("--peak_tflops", type=float, default=None)
    args = p.parse_args(argv)
    res = run_inference(args.variants, args.batch_sizes, args.image_size, args.repeats,
                        torch_compile=args.torch_compile, lowering=args.lowering, peak_tflops=args.peak_tflops)
    print(markdown(res))


if __name__ == "__main__":
    main()
