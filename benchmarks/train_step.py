"""Training-step throughput: JAX vs PyTorch eager, same weights, batch and image size.

One step = forward (BatchNorm in train mode: batch statistics + running-average update) +
softmax cross-entropy + backward + AdamW update (lr 1e-3, weight decay 0.05 on every
parameter in both frameworks, drop path 0). JAX: one ``jax.jit`` step with the state
donated; PyTorch: eager ``loss.backward(); opt.step()`` in NCHW and channels_last.
Steps of all implementations are timed round-robin (``benchmarks.common``).

Peak memory is measured per framework as the process RSS high-water mark (``VmHWM``, reset
through ``/proc/self/clear_refs`` before each framework's own warm-up+timed steps, run
separately for this purpose), reported as the peak and as the growth over the RSS at the
reset; for JAX, XLA's ``compiled.memory_analysis()`` (temp + argument + output buffers of the
step) is reported too.

    python -m benchmarks.train_step --variants t8 --batch_sizes 8
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from benchmarks import common

LR, WD = 1e-3, 0.05


def lower_jax_step(variant: str, variables: Dict[str, Any], batch: int, image_size: int,
                   num_classes: int = 1000, lowering: Optional[str] = None, remat: str = "none"):
    """(lowered step, state, x, y): ``step(state, x, y) -> (state, loss)`` traced and lowered for one
    batch, not compiled (callers may compile several in parallel). ``state`` is a fresh copy: the
    step donates (invalidates) its input buffers."""
    import jax
    import jax.numpy as jnp
    import optax

    import fastvit_jax

    model = fastvit_jax.create_model(variant, num_classes=num_classes, lowering=lowering,
                                     dtype=common.jax_compute_dtype(), remat=remat)
    tx = optax.adamw(LR, weight_decay=WD)
    params = variables["params"]
    state = (params, variables["batch_stats"], tx.init(params))

    def step(state, x, y):
        params, stats, opt = state

        def loss_fn(p):
            logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True, mutable=["batch_stats"])
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            return loss, upd["batch_stats"]

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt = tx.update(grads, opt, params)
        return (optax.apply_updates(params, updates), new_stats, opt), loss

    rs = np.random.RandomState(2)
    x = jnp.asarray(rs.randn(batch, image_size, image_size, 3).astype(np.float32))
    y = jnp.asarray(rs.randint(0, num_classes, size=(batch,)).astype(np.int32))
    lowered = jax.jit(step, donate_argnums=0).lower(state, x, y)
    return lowered, jax.tree.map(lambda a: jnp.array(a, copy=True), state), x, y


def compiled_memory_mib(compiled) -> Dict[str, float]:
    """XLA's buffer sizes of a compiled program (MiB): temporaries, arguments, outputs, aliased."""
    try:
        ma = compiled.memory_analysis()
        return {"xla_temp_mib": ma.temp_size_in_bytes / 2 ** 20, "xla_argument_mib": ma.argument_size_in_bytes / 2 ** 20,
                "xla_output_mib": ma.output_size_in_bytes / 2 ** 20, "xla_alias_mib": ma.alias_size_in_bytes / 2 ** 20}
    except Exception:  # noqa: BLE001 - not on every backend
        return {}


def jax_step_call(compiled, state, x, y) -> Callable[[], Any]:
    """A blocking ``call() -> loss`` of a compiled step that donates its state: each call feeds the
    previous call's state back in."""
    holder = {"state": state}

    def call():
        holder["state"], loss = compiled(holder["state"], x, y)
        return loss.block_until_ready()

    return call


def build_jax_step(variant: str, variables: Dict[str, Any], batch: int, image_size: int,
                   num_classes: int = 1000, lowering: Optional[str] = None, remat: str = "none"):
    """(step_fn(state, x, y) -> (state, loss) compiled, state, x, y, compile_s, memory dict)."""
    lowered, state, x, y = lower_jax_step(variant, variables, batch, image_size, num_classes, lowering, remat)
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    return compiled, state, x, y, compile_s, compiled_memory_mib(compiled)


def build_torch_step(module, batch: int, image_size: int, channels_last: bool, num_classes: int = 1000):
    import torch

    device = common.torch_device()
    m = copy.deepcopy(module).to(device).train()
    rs = np.random.RandomState(2)
    x = torch.from_numpy(rs.randn(batch, image_size, image_size, 3).astype(np.float32).transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(rs.randint(0, num_classes, size=(batch,)).astype(np.int64))
    x, y = x.to(device), y.to(device)
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(m.parameters(), lr=LR, weight_decay=WD)
    loss_f = torch.nn.CrossEntropyLoss()

    def step():
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = loss_f(m(x), y)
        else:
            loss = loss_f(m(x), y)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return loss

    return step


_CL_PROBE = """
import torch
torch.set_num_threads(2)
cl = torch.channels_last
c = torch.nn.Conv2d(3, 48, 1, 2, 0, bias=False).to(memory_format=cl)
x = torch.randn(8, 3, 256, 256).contiguous(memory_format=cl)
c(x).square().mean().backward()
"""


def torch_channels_last_backward_ok() -> Dict[str, Any]:
    """Probe, in a subprocess, a crash seen with torch 2.13.0 CPU: the backward of a channels_last
    1x1 stride-2 conv with 3 input channels at 8x3x256x256 (FastViT's stem ``conv_scale``) dies with
    SIGSEGV / 'double free or corruption'. Returns {'ok': bool, 'reason': str}."""
    import subprocess
    import sys

    import torch

    if torch.cuda.is_available():
        return {"ok": True, "reason": "cuda"}
    try:
        r = subprocess.run([sys.executable, "-c", _CL_PROBE], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": "channels_last backward probe timed out"}
    if r.returncode == 0:
        return {"ok": True, "reason": "probe passed"}
    return {"ok": False, "reason": (f"torch {torch.__version__} CPU crashes (exit {r.returncode}, "
                                    f"{(r.stderr.strip().splitlines() or [''])[-1][:120]!r}) in the backward of a "
                                    "channels_last Conv2d(3, 48, 1, stride=2) on 8x3x256x256 (the stem's conv_scale); "
                                    "torch channels_last training not timed")}


def _scalar(v) -> float:
    return float(v.detach()) if hasattr(v, "detach") else float(v)


def _peak_memory(fn, steps: int, impl: str) -> Dict[str, Optional[float]]:
    """Host RSS high-water mark over ``steps`` calls; on an accelerator also the device's peak
    (PyTorch: ``max_memory_allocated`` after a reset; JAX: the allocator's ``peak_bytes_in_use``
    since the process started, which cannot be reset)."""
    import gc

    import torch

    gc.collect()
    base = common.rss_mib()
    ok = common.reset_peak_rss()
    cuda = torch.cuda.is_available()
    if cuda and impl.startswith("torch"):
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        fn()
    peak = common.peak_rss_mib()
    out = {"rss_start_mib": base, "peak_rss_mib": peak if ok else None,
           "peak_growth_mib": (peak - base) if ok and peak is not None and base is not None else None,
           "method": "VmHWM after clear_refs" if ok else "unavailable"}
    if impl.startswith("torch") and cuda:
        out["device_peak_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    elif impl == "jax":
        import jax

        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            out["device_peak_mib"] = stats["peak_bytes_in_use"] / 2 ** 20
    return out


def run_train_step(variants: Sequence[str] = ("t8",), batch_sizes: Sequence[int] = (8,), image_size: int = 256,
                   repeats: int = 5, warmup: int = 2, memory_steps: int = 2, flops_per_image: Optional[Dict] = None,
                   peak_tflops: Optional[float] = None, lowering: Optional[str] = None) -> Dict[str, Any]:
    import jax

    common.setup_torch_threads()
    peak, peak_src = common.accelerator_peak_tflops(peak_tflops)
    rows: List[Dict[str, Any]] = []
    summary: List[Dict[str, Any]] = []
    notes: List[str] = []
    cl_probe = torch_channels_last_backward_ok()
    if not cl_probe["ok"]:
        notes.append(cl_probe["reason"])
        common.log(notes[-1])
    for variant in variants:
        tm = common.torch_model(variant)
        variables = common.flax_variables_from_torch(tm)
        for batch in batch_sizes:
            compiled, state, x, y, compile_s, mem = build_jax_step(variant, variables, batch, image_size,
                                                                   lowering=lowering)
            fns = {"jax": jax_step_call(compiled, state, x, y),
                   "torch_nchw": build_torch_step(tm, batch, image_size, channels_last=False)}
            if cl_probe["ok"]:
                fns["torch_cl"] = build_torch_step(tm, batch, image_size, channels_last=True)
            # losses of the first step agree (same weights, same batch): a cheap sanity check
            first = {k: _scalar(f()) for k, f in fns.items()}
            memory = {k: _peak_memory(f, memory_steps, k) for k, f in fns.items()}
            common.log(f"[train_step] {variant} b{batch} {image_size}px: timing {len(fns)} implementations x {repeats}")
            times = common.interleaved_timings(fns, repeats=repeats, warmup=warmup)
            by = {}
            for impl, ts in times.items():
                s = common.summarize(ts, items=batch)
                row = {"variant": variant, "batch": batch, "image_size": image_size, "impl": impl,
                       "img_s": s["per_s"], "img_s_min": s["per_s_min"], "img_s_max": s["per_s_max"], **s,
                       "first_step_loss": first[impl], "memory": memory[impl]}
                if impl == "jax":
                    row["compile_s"] = compile_s
                    row["memory"].update(mem)
                gfl = (flops_per_image or {}).get((variant, "unfused"))
                if gfl and peak:
                    row["mfu"] = 3 * gfl * 1e9 * s["per_s"] / (peak * 1e12)  # fwd + bwd ~ 3x forward
                rows.append(row)
                by[impl] = row
            best = max((by[k] for k in ("torch_nchw", "torch_cl") if k in by), key=lambda r: r["img_s"])
            summary.append({"variant": variant, "batch": batch, "image_size": image_size,
                            "jax_img_s": by["jax"]["img_s"], "torch_nchw_img_s": by["torch_nchw"]["img_s"],
                            "torch_cl_img_s": by.get("torch_cl", {}).get("img_s"), "best_torch_eager": best["impl"],
                            "jax_over_torch": by["jax"]["img_s"] / best["img_s"], "jax_compile_s": compile_s,
                            "jax_over_torch_fastest": by["jax"]["img_s_max"] / max(
                                by[k]["img_s_max"] for k in ("torch_nchw", "torch_cl") if k in by),
                            "first_step_loss": first})
            del fns, compiled
    return {"rows": rows, "summary": summary,
            "settings": {"repeats": repeats, "warmup": warmup, "optimizer": f"AdamW lr={LR} wd={WD}",
                         "loss": "softmax cross-entropy", "bn": "train mode", "jax_backend": jax.default_backend()},
            "notes": notes + ([f"MFU against {peak:.0f} TFLOP/s ({peak_src}), train FLOPs = 3 x forward (2 x conv+dot MACs)"] if peak else []) + [
                "peak memory: process RSS high-water mark (VmHWM) reset before each framework's own "
                f"{memory_steps} steps; 'growth' = peak minus RSS at the reset (the whole process, so both "
                "frameworks' resident models/allocator caches count in the baseline; memory PyTorch freed into "
                "glibc's heap during the earlier steps is already resident, so its growth is a lower bound)"]}


def markdown(result: Dict[str, Any]) -> str:
    rows = []
    for s in result["summary"]:
        cells = {}
        mems = {}
        for r in result["rows"]:
            if (r["variant"], r["batch"]) == (s["variant"], s["batch"]):
                cells[r["impl"]] = f"{r['img_s']:.1f} ({r['img_s_min']:.1f}–{r['img_s_max']:.1f})"
                g = r["memory"].get("device_peak_mib", r["memory"].get("peak_growth_mib"))
                mems[r["impl"]] = f"{g:.0f}" if g is not None else "–"
        rows.append([s["variant"], s["batch"], s["image_size"], cells["jax"], cells["torch_nchw"],
                     cells.get("torch_cl", "crashes (see notes)"),
                     f"**{s['jax_over_torch']:.2f}×** ({s['jax_over_torch_fastest']:.2f}×)", s["jax_compile_s"],
                     f"{mems['jax']} / {mems['torch_nchw']} / {mems.get('torch_cl', '–')}"])
    head = ["variant", "batch", "px", "JAX img/s (min–max)", "torch NCHW", "torch channels_last",
            "JAX / best torch: medians (fastest calls)", "JAX compile s",
            "peak MiB (JAX / NCHW / CL): device peak on accelerators, else host RSS growth"]
    out = common.markdown_table(head, rows)
    return out + ("\n\n" + "\n".join(f"- {n}" for n in result.get("notes", [])) if result.get("notes") else "")


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[8])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--peak_tflops", type=float, default=None)
    args = p.parse_args(argv)
    print(markdown(run_train_step(args.variants, args.batch_sizes, args.image_size, args.repeats,
                                  peak_tflops=args.peak_tflops)))


if __name__ == "__main__":
    main()
