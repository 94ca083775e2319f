"""Training-step grid: JAX before and after the accelerator work, against PyTorch channels_last eager.

For each variant and batch size, in one process and timed round-robin (``benchmarks.common``):

- ``jax_before``: the step as traced before commit b84e817 (float32-result convs, two-pass
  BatchNorm statistics, no rematerialisation; ``benchmarks/baseline_numerics.py``);
- ``jax_after``: today's step (convs in the compute dtype, one-pass statistics, the remat policy
  the trainer picks for this backend, ``--remat auto``);
- ``torch_eager``: PyTorch eager in channels_last (NCHW where channels_last training crashes, as
  torch 2.13.0 does on some CPUs), under bfloat16 autocast on CUDA.

The step is ``benchmarks.train_step``'s (forward with BatchNorm in train mode, cross-entropy,
backward, AdamW), JAX in bfloat16 on accelerators. One batch size at a time, both JAX programs
are traced, compiled (``--compile_threads`` at a time; 1 by default: a run compiling two in
parallel on an H200 reached no row within 140 s, where one t8 step compiled in ~35 s on its
own) and timed, and the row is written out, so
a step cut off by a time limit keeps the rows it finished. With ``--trace_file`` the first
variant's ``jax_after`` step at the first batch size is also profiled: its Perfetto trace is
copied there and the time per HLO op and per model scope goes into the JSON.

    python -m benchmarks.train_grid --variants t8 sa12 ma36 --batch_sizes 128 256 --out grid.json
    python -m benchmarks.train_grid --tiny --out /tmp/grid.json       # the whole path on CPU, small

``--tiny`` runs t8 at 32 px, batch 2, 2 timed rounds, native convs: it checks the path, it measures nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import os
import shutil
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from benchmarks import common, train_step

CONFIGS = ("jax_before", "jax_after")
# 'native' convs compile the CPU train step ~3x faster than the CPU default 'shift'
TINY = dict(variants=["t8"], batch_sizes=[2], image_size=32, repeats=2, warmup=1, lowering="native")


def train_flops_per_image(variant: str, image_size: int) -> float:
    """3 x forward FLOPs (2 x conv + matmul MACs of the train form, counted on the jaxpr)."""
    from benchmarks.flops import abstract_model, forward_macs

    return 3 * 2 * forward_macs(*abstract_model(variant, "unfused"), image_size)


def _traced_with(config: str):
    from benchmarks.baseline_numerics import baseline_numerics

    return baseline_numerics() if config == "jax_before" else contextlib.nullcontext()


def _remat(config: str) -> str:
    import jax

    from fastvit_jax.training.setup import resolve_remat

    return "none" if config == "jax_before" else resolve_remat("auto", jax.default_backend())


def compile_all(lowered: Dict[Any, Any], threads: int) -> Dict[Any, Dict[str, Any]]:
    """{key: {'compiled', 'compile_s'}} compiling every lowered program, ``threads`` at a time."""
    def one(key, lo):
        t0 = time.perf_counter()
        c = lo.compile()
        common.log(f"[train_grid] compiled {key} in {time.perf_counter() - t0:.0f} s")
        return {"compiled": c, "compile_s": time.perf_counter() - t0}

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = {k: pool.submit(one, k, lo) for k, lo in lowered.items()}
        return {k: f.result() for k, f in futures.items()}


def _torch_peak_mib(fn: Callable[[], Any]) -> Optional[float]:
    import torch

    if not torch.cuda.is_available():
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2 ** 20


def profile_step(call: Callable[[], Any], compiled, steps: int, trace_file: str) -> Dict[str, Any]:
    """Profile ``steps`` calls; copy the Perfetto trace to ``trace_file``; time per HLO op and scope."""
    from benchmarks import trace

    trace_dir = tempfile.mkdtemp(prefix="fastvit-grid-trace-")
    out = trace.profile_calls(call, compiled.as_text(), steps, trace_dir, top=15)
    src = trace.perfetto_trace_path(trace_dir)
    os.makedirs(os.path.dirname(os.path.abspath(trace_file)), exist_ok=True)
    shutil.copyfile(src, trace_file)
    out.update({"steps": steps, "trace_file": trace_file, "trace_bytes": os.path.getsize(trace_file)})
    shutil.rmtree(trace_dir, ignore_errors=True)
    return out


def run_grid(variants: Sequence[str], batch_sizes: Sequence[int], image_size: int = 256, repeats: int = 10,
             warmup: int = 2, compile_threads: int = 1, trace_file: Optional[str] = None,
             trace_steps: int = 3, lowering: Optional[str] = None,
             on_progress: Callable[[Dict[str, Any]], None] = lambda result: None) -> Dict[str, Any]:
    """The grid as {'rows', 'compiles', 'errors', 'profile', 'notes', 'settings'}; ``on_progress(result)`` is
    called with the partial result after every variant's compile and every row (write it out: a
    step cut off by a time limit keeps what it measured). A variant that fails (out of memory,
    say) is recorded under 'errors' and the grid goes on."""
    import gc

    import jax

    common.setup_torch_threads()
    peak, peak_src = common.accelerator_peak_tflops()
    cl = train_step.torch_channels_last_backward_ok()
    notes: List[str] = [] if cl["ok"] else [cl["reason"] + "; PyTorch timed in NCHW instead"]
    result: Dict[str, Any] = {
        "rows": [], "compiles": [], "errors": [], "profile": None,
        "notes": notes + ([f"MFU against {peak:.0f} TFLOP/s ({peak_src}); train FLOPs = 3 x 2 x conv+matmul MACs "
                           "of the forward"] if peak else []),
        "settings": {"repeats": repeats, "warmup": warmup, "image_size": image_size, "lowering": lowering,
                     "jax_backend": jax.default_backend(), "jax_dtype": str(common.jax_compute_dtype().dtype),
                     "torch": ("channels_last" if cl["ok"] else "NCHW") + " eager"
                              + (", bfloat16 autocast" if _cuda() else "")}}
    for variant in variants:
        try:
            _grid_variant(result, variant, batch_sizes, image_size, repeats, warmup, compile_threads, trace_file,
                          trace_steps, lowering, peak, cl["ok"], on_progress)
        except Exception as e:  # noqa: BLE001 - one variant's failure (OOM) must not lose the others
            common.log(f"[train_grid] {variant} failed: {e!r}"[:2000])
            result["errors"].append({"variant": variant, "error": repr(e)[:2000]})
        gc.collect()
        _empty_torch_cache()
        on_progress(result)
    return result


def _grid_variant(result: Dict[str, Any], variant: str, batch_sizes: Sequence[int], image_size: int, repeats: int,
                  warmup: int, compile_threads: int, trace_file: Optional[str], trace_steps: int,
                  lowering: Optional[str], peak: Optional[float], channels_last: bool, on_progress) -> None:
    import gc

    t0 = time.perf_counter()
    tm = common.torch_model(variant)
    variables = common.flax_variables_from_torch(tm)
    flops = train_flops_per_image(variant, image_size)
    common.log(f"[train_grid] {variant}: weights and FLOP count in {time.perf_counter() - t0:.0f} s")
    for batch in batch_sizes:  # one batch size at a time: a step cut off keeps the rows it finished
        lowered, inputs = {}, {}
        for config in CONFIGS:
            t0 = time.perf_counter()
            with _traced_with(config):
                lo, state, x, y = train_step.lower_jax_step(variant, variables, batch, image_size,
                                                            lowering=lowering, remat=_remat(config))
            lowered[batch, config], inputs[batch, config] = lo, (state, x, y)
            common.log(f"[train_grid] {variant}: traced {config} b{batch} in {time.perf_counter() - t0:.0f} s")
        t0 = time.perf_counter()
        programs = compile_all(lowered, compile_threads)
        result["compiles"].append({"variant": variant, "batch": batch, "programs": len(programs),
                                   "wall_s": time.perf_counter() - t0, "threads": compile_threads})
        on_progress(result)
        fns = {c: train_step.jax_step_call(programs[batch, c]["compiled"], *inputs[batch, c]) for c in CONFIGS}
        fns["torch_eager"] = train_step.build_torch_step(tm, batch, image_size, channels_last=channels_last)
        first = {k: _loss_value(f()) for k, f in fns.items()}
        torch_peak = _torch_peak_mib(fns["torch_eager"])
        common.log(f"[train_grid] {variant} b{batch}: timing {len(fns)} x {repeats}")
        times = common.interleaved_timings(fns, repeats=repeats, warmup=warmup)
        row: Dict[str, Any] = {"variant": variant, "batch": batch, "image_size": image_size,
                               "train_flops_per_image": flops, "first_step_loss": first}
        for impl, ts in times.items():
            s = common.summarize(ts, items=batch)
            cell = {"img_s": s["per_s"], "img_s_min": s["per_s_min"], "img_s_max": s["per_s_max"],
                    "median_ms": s["median_ms"]}
            if impl in CONFIGS:
                cell.update(compile_s=programs[batch, impl]["compile_s"], remat=_remat(impl),
                            **train_step.compiled_memory_mib(programs[batch, impl]["compiled"]))
            else:
                cell["device_peak_mib"] = torch_peak
            if peak:
                cell["mfu"] = flops * s["per_s"] / (peak * 1e12)
            row[impl] = cell
        row["after_over_before"] = row["jax_after"]["img_s"] / row["jax_before"]["img_s"]
        row["after_over_torch"] = row["jax_after"]["img_s"] / row["torch_eager"]["img_s"]
        result["rows"].append(row)
        common.log(f"[train_grid] {variant} b{batch}: img/s before {row['jax_before']['img_s']:.0f}, after "
                   f"{row['jax_after']['img_s']:.0f}, PyTorch {row['torch_eager']['img_s']:.0f}")
        if trace_file and result["profile"] is None:
            profile = profile_step(fns["jax_after"], programs[batch, "jax_after"]["compiled"], trace_steps,
                                   trace_file)
            profile.update(variant=variant, batch=batch, config="jax_after")
            result["profile"] = profile
        on_progress(result)
        del fns, programs, lowered, inputs
        gc.collect()
        _empty_torch_cache()
    common.log(f"[train_grid] {variant} done")


def _loss_value(loss: Any) -> float:
    return float(loss.detach()) if hasattr(loss, "detach") else float(loss)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _empty_torch_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def markdown(result: Dict[str, Any]) -> str:
    def cell(c):
        return f"{c['img_s']:,.0f}"

    rows = []
    for r in result["rows"]:
        b, a, t = r["jax_before"], r["jax_after"], r["torch_eager"]
        rows.append([r["variant"], r["batch"], cell(b), cell(a), cell(t), f"{r['after_over_before']:.2f}×",
                     f"**{r['after_over_torch']:.2f}×**",
                     f"{100 * a['mfu']:.2f}%" if "mfu" in a else "–",
                     f"{b.get('xla_temp_mib', 0):,.0f} / {a.get('xla_temp_mib', 0):,.0f}",
                     f"{t['device_peak_mib']:,.0f}" if t.get("device_peak_mib") else "–",
                     f"{b['compile_s']:.0f} / {a['compile_s']:.0f}", a["remat"]])
    head = ["variant", "batch", "JAX before img/s", "JAX after img/s", "PyTorch eager img/s", "after / before",
            "after / PyTorch", "MFU after", "XLA temp MiB before / after", "PyTorch peak MiB",
            "compile s before / after (parallel)", "remat after"]
    out = common.markdown_table(head, rows)
    p = result.get("profile")
    if p:
        out += (f"\n\nProfile of {p['variant']} batch {p['batch']} ({p['config']}): {p['wall_ms_per_call']:.1f} ms "
                f"per step, {p['op_ms_per_call']:.1f} ms of ops; trace {p['trace_file']}\n\n")
        out += common.markdown_table(["scope", "ms per step", "share"],
                                     [[s["scope"], f"{s['ms']:.2f}", f"{100 * s['share']:.1f}%"]
                                      for s in p["scopes"][:10]])
    notes = result.get("notes") or []
    return out + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")


def main(argv=None) -> None:
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12", "ma36"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[128, 256])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--compile_threads", type=int, default=1,
                   help="compile the JAX programs this many at a time (parallel compiles on a GPU are untested)")
    p.add_argument("--lowering", choices=["native", "shift"], default=None,
                   help="conv lowering (default: per backend)")
    p.add_argument("--trace_file", default=None, help="profile one step; copy its Perfetto trace (.json.gz) here")
    p.add_argument("--tiny", action="store_true", help=f"a CPU check of the whole path: {TINY}")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    if args.tiny:
        for k, v in TINY.items():
            setattr(args, k, v)
    t0 = time.perf_counter()
    machine = common.machine_info()

    def write(result: Dict[str, Any]) -> None:
        if args.out:
            common.write_json({**result, "machine": machine, "tiny": bool(args.tiny),
                               "wall_s": time.perf_counter() - t0}, args.out)

    result = run_grid(args.variants, args.batch_sizes, args.image_size, args.repeats, args.warmup,
                      args.compile_threads, args.trace_file, lowering=args.lowering, on_progress=write)
    write(result)
    print(markdown(result))


if __name__ == "__main__":
    main()
