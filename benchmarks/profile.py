"""Per-block profile of the fused forward: JAX vs PyTorch, piece by piece, same weights.

Each piece (stem, stage 0..3, final_conv + head) is jitted on its own (JAX) / called on its
own (PyTorch eager NCHW and channels_last) on the activations the previous piece produced,
and all pieces of all implementations are timed round-robin. The sum of the JAX pieces is a
bit above the whole-network time (no cross-piece fusion, one dispatch per piece).

Also times a few single ops at the shapes of t8's stage 0 that explain the totals (GELU forms,
depthwise 3x3/7x7, 1x1 conv) against their PyTorch channels_last counterparts.

    python -m benchmarks.profile --variants t8 sa12 --batch 8
"""

from __future__ import annotations

import argparse
import copy
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from benchmarks import common


def _pieces_jax(model):
    def stem(mod, x):
        for blk in mod.stem:
            x = blk(x, False)
        return x

    pieces = [("stem", stem)]
    for i in range(len(model.cfg.layers)):
        pieces.append((f"stage {i}", lambda mod, x, i=i: mod.stages[i](x, False)))
    pieces.append(("final_conv + head", lambda mod, x: mod.forward_head(mod.final_conv(x, False), False)))
    return pieces


def _pieces_torch(m):
    pieces = [("stem", m.stem)] + [(f"stage {i}", s) for i, s in enumerate(m.stages)]
    pieces.append(("final_conv + head", lambda t: m.forward_head(m.final_conv(t))))
    return pieces


def profile_variant(variant: str, batch: int = 8, image_size: int = 256, repeats: int = 10,
                    lowering: Optional[str] = None) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import torch

    import fastvit_jax
    import torch_ref

    common.setup_torch_threads()
    device = common.torch_device()
    tm = torch_ref.reparameterize_model(common.torch_model(variant))
    variables = common.flax_variables_from_torch(tm)
    tm = tm.to(device)
    model = fastvit_jax.create_model(variant, num_classes=variables["params"]["head"]["fc"]["bias"].shape[0],
                                     inference_mode=True, lowering=lowering, dtype=common.jax_compute_dtype())
    xnp = np.random.RandomState(1).randn(batch, image_size, image_size, 3).astype(np.float32)
    xj = jnp.asarray(xnp)
    x_nchw = torch.from_numpy(xnp.transpose(0, 3, 1, 2).copy()).to(device)
    tm_cl = copy.deepcopy(tm).to(memory_format=torch.channels_last)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    fns: Dict[str, Any] = {}
    shapes: Dict[str, Any] = {}
    with torch.inference_mode():
        for (name, fn), (_, t_nchw), (_, t_cl) in zip(_pieces_jax(model), _pieces_torch(tm), _pieces_torch(tm_cl)):
            f = jax.jit(lambda v, x, fn=fn: model.apply(v, x, method=fn)).lower(variables, xj).compile()
            shapes[name] = tuple(xj.shape)
            fns[f"jax|{name}"] = (lambda f=f, x=xj: f(variables, x).block_until_ready())
            fns[f"torch_nchw|{name}"] = (lambda t=t_nchw, x=x_nchw: common.torch_infer(t, x))
            fns[f"torch_cl|{name}"] = (lambda t=t_cl, x=x_cl: common.torch_infer(t, x))
            xj, x_nchw, x_cl = f(variables, xj), t_nchw(x_nchw), t_cl(x_cl)
    whole = jax.jit(lambda v, x: model.apply(v, x)).lower(variables, jnp.asarray(xnp)).compile()
    xw = jnp.asarray(xnp)
    fns["jax|whole network"] = lambda: whole(variables, xw).block_until_ready()
    xn = torch.from_numpy(xnp.transpose(0, 3, 1, 2).copy()).to(device)
    fns["torch_nchw|whole network"] = lambda: common.torch_infer(tm, xn)
    xc = xn.contiguous(memory_format=torch.channels_last)
    fns["torch_cl|whole network"] = lambda: common.torch_infer(tm_cl, xc)
    common.log(f"[profile] {variant} b{batch}: timing {len(fns)} pieces x {repeats}")
    times = common.interleaved_timings(fns, repeats=repeats, warmup=2)
    rows = []
    for key, ts in times.items():
        impl, name = key.split("|")
        s = common.summarize(ts)
        rows.append({"variant": variant, "batch": batch, "piece": name, "impl": impl, "input_shape_nhwc":
                     shapes.get(name, (batch, image_size, image_size, 3)), **s})
    return {"rows": rows}


def op_profile(batch: int = 8, hw: int = 64, c: int = 48, mlp_ratio: int = 3, repeats: int = 15) -> Dict[str, Any]:
    """Single ops at t8 stage-0 shapes: JAX (default lowering) vs torch channels_last (float32 on CPU;
    on an accelerator both take bfloat16 inputs)."""
    import jax
    import jax.numpy as jnp
    import torch

    from fastvit_jax.conv import conv2d
    from fastvit_jax.layers import gelu as model_gelu

    common.setup_torch_threads()
    device = common.torch_device()
    jdt = common.jax_compute_dtype()
    tdt = torch.float32 if device.type == "cpu" else torch.bfloat16
    rs = np.random.RandomState(0)
    x = rs.randn(batch, hw, hw, c).astype(np.float32)
    h = rs.randn(batch, hw, hw, c * mlp_ratio).astype(np.float32)
    xj, hj = jnp.asarray(x, jdt), jnp.asarray(h, jdt)

    def to_torch(a):
        return torch.from_numpy(a.transpose(0, 3, 1, 2).copy()).to(device, tdt).contiguous(
            memory_format=torch.channels_last)

    xt, ht = to_torch(x), to_torch(h)
    k3 = jnp.asarray(rs.randn(3, 3, 1, c), jdt)
    k7 = jnp.asarray(rs.randn(7, 7, 1, c), jdt)
    k1 = jnp.asarray(rs.randn(1, 1, c, c * mlp_ratio), jdt)

    def conv(cin, cout, k, groups=1):
        return torch.nn.Conv2d(cin, cout, k, 1, k // 2, groups=groups).to(device, tdt).to(
            memory_format=torch.channels_last)

    dw3, dw7, pw = conv(c, c, 3, c), conv(c, c, 7, c), conv(c, c * mlp_ratio, 1)
    tgelu = torch.nn.GELU()

    def jit(f, *a):
        c_ = jax.jit(f).lower(*a).compile()
        return lambda: c_(*a).block_until_ready()

    ops = {
        f"GELU {tuple(h.shape)}|jax: fastvit_jax.layers.gelu (0.5x(1+lax.erf(x/√2)))": jit(model_gelu, hj),
        f"GELU {tuple(h.shape)}|jax: jax.nn.gelu(approximate=False) (erfc)": jit(
            lambda t: jax.nn.gelu(t, approximate=False), hj),
        f"GELU {tuple(h.shape)}|jax: tanh approximation": jit(lambda t: jax.nn.gelu(t, approximate=True), hj),
        f"GELU {tuple(h.shape)}|torch_cl: nn.GELU()": lambda: common.torch_infer(tgelu, ht),
        f"dw 3x3 {tuple(x.shape)}|jax": jit(lambda a, k: conv2d(a, k, padding=1, groups=c), xj, k3),
        f"dw 3x3 {tuple(x.shape)}|torch_cl": lambda: common.torch_infer(dw3, xt),
        f"dw 7x7 {tuple(x.shape)}|jax": jit(lambda a, k: conv2d(a, k, padding=3, groups=c), xj, k7),
        f"dw 7x7 {tuple(x.shape)}|torch_cl": lambda: common.torch_infer(dw7, xt),
        f"1x1 {c}->{c * mlp_ratio} {tuple(x.shape)}|jax": jit(lambda a, k: conv2d(a, k), xj, k1),
        f"1x1 {c}->{c * mlp_ratio} {tuple(x.shape)}|torch_cl": lambda: common.torch_infer(pw, xt),
    }
    times = common.interleaved_timings(ops, repeats=repeats, warmup=2)
    rows = []
    for key, ts in times.items():
        op, impl = key.split("|")
        rows.append({"op": op, "impl": impl, **common.summarize(ts)})
    return {"rows": rows}


def run_profile(variants: Sequence[str] = ("t8",), batch: int = 8, image_size: int = 256, repeats: int = 10,
                ops: bool = True, lowering: Optional[str] = None) -> Dict[str, Any]:
    rows: List[Dict[str, Any]] = []
    for v in variants:
        rows += profile_variant(v, batch, image_size, repeats, lowering=lowering)["rows"]
    out = {"rows": rows, "settings": {"batch": batch, "image_size": image_size, "repeats": repeats, "form": "fused"}}
    if ops:
        out["ops"] = op_profile(batch=batch)["rows"]
    return out


def markdown(result: Dict[str, Any]) -> str:
    parts = []
    variants = list(dict.fromkeys(r["variant"] for r in result["rows"]))
    for v in variants:
        pieces = list(dict.fromkeys(r["piece"] for r in result["rows"] if r["variant"] == v))
        by = {(r["piece"], r["impl"]): r for r in result["rows"] if r["variant"] == v}
        rows = []
        for p in pieces:
            j, n, c = by[(p, "jax")], by[(p, "torch_nchw")], by[(p, "torch_cl")]
            best = min(n["median_ms"], c["median_ms"])
            rows.append([p, str(j["input_shape_nhwc"]), f"{j['median_ms']:.2f} ({j['min_ms']:.1f}–{j['max_ms']:.1f})",
                         f"{n['median_ms']:.2f}", f"{c['median_ms']:.2f}", f"{best / j['median_ms']:.2f}×"])
        parts.append(f"**{v}**, fused, batch {result['settings']['batch']}, {result['settings']['image_size']} px "
                     "(ms per call, median (min–max))\n\n" + common.markdown_table(
                         ["piece", "input (NHWC)", "JAX ms", "torch NCHW ms", "torch CL ms", "JAX speed-up vs best"],
                         rows))
    if result.get("ops"):
        rows = [[r["op"], r["impl"], f"{r['median_ms']:.2f} ({r['min_ms']:.2f}–{r['max_ms']:.2f})"]
                for r in result["ops"]]
        parts.append("Single ops (t8 stage-0 shapes)\n\n" + common.markdown_table(["op", "implementation", "ms"], rows))
    return "\n\n".join(parts)


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    print(markdown(run_profile(args.variants, args.batch, args.image_size, args.repeats)))


if __name__ == "__main__":
    main()
