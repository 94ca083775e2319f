"""Params / GMACs of the variants: XLA cost analysis beside Apple's code (timm's counts for the
MobileCLIP towers mci0 ... mci4) and the paper. Models are built with 1000 classes, as the reference counts.

GMACs = ``jax.jit(apply).lower(...).compile().cost_analysis()['flops'] / 2`` for one 256x256
image, with the 'native' conv lowering (the 'shift' lowering turns depthwise convs into
elementwise multiply-adds, which cost analysis counts differently). XLA counts every
floating-point op (adds of residuals/biases, GELU's polynomial, softmax, BN in the unfused
graph...), while the official numbers count only conv/linear multiply-accumulates, so XLA's
figure is an upper bound of the official one. The "conv+dot" column counts only the
multiply-accumulates of ``conv_general_dilated`` / ``dot_general`` in the jaxpr (no compile). Params: leaves of the Flax ``params`` collection
(BatchNorm running statistics excluded, as in PyTorch's ``parameters()``).

    python -m benchmarks.flops --variants t8 t12 s12 sa12 sa24 sa36 ma36 mci0 mci1 mci2 mci3 mci4
"""

from __future__ import annotations

import argparse
import time
from typing import Any, Dict, List, Optional, Sequence

from benchmarks import common


def jaxpr_macs(fn, *args) -> int:
    """Multiply-accumulates of the conv_general_dilated and dot_general ops of ``fn(*args)`` only
    (what the official counts measure), walking the jaxpr and its sub-jaxprs."""
    import jax
    import numpy as np

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "conv_general_dilated":
                out = eqn.outvars[0].aval.shape
                rhs = eqn.invars[1].aval.shape
                dn = eqn.params["dimension_numbers"]
                out_feat = rhs[dn.rhs_spec[0]]
                total += int(np.prod(out)) * int(np.prod(rhs)) // out_feat
            elif name == "dot_general":
                out = eqn.outvars[0].aval.shape
                (lc, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                total += int(np.prod(out)) * int(np.prod([lhs[d] for d in lc]))
            for sub in jax.core.subjaxprs(eqn) if hasattr(jax.core, "subjaxprs") else _subjaxprs(eqn):
                total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def _subjaxprs(eqn):
    for v in eqn.params.values():
        for item in (v if isinstance(v, (list, tuple)) else [v]):
            if hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
                yield item.jaxpr
            elif hasattr(item, "eqns"):
                yield item


def abstract_model(variant: str, form: str = "unfused", lowering: str = "native"):
    """(model, variables as shapes) of ``variant`` in ``form`` ('unfused'/'fused'), 1000 classes, nothing allocated."""
    import jax
    import jax.numpy as jnp

    import fastvit_jax

    model = fastvit_jax.create_model(variant, num_classes=1000, inference_mode=form == "fused", lowering=lowering)
    return model, jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))


def forward_macs(model, shapes, image_size: int) -> int:
    """Conv + matmul MACs of one ``image_size`` image through ``model``'s eval forward (``jaxpr_macs``)."""
    import jax
    import jax.numpy as jnp

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    return jaxpr_macs(lambda v, xx: model.apply(v, xx, train=False), shapes, x)


def count_variant(variant: str, image_size: int = 256, forms: Sequence[str] = ("unfused", "fused"),
                  lowering: str = "native") -> Dict[str, Any]:
    """{'params': {form: n}, 'gmacs': {form: g}, 'flops_per_image': {form: flops}} for one image."""
    import jax
    import jax.numpy as jnp

    out: Dict[str, Any] = {"variant": variant, "image_size": image_size, "params": {}, "gmacs": {},
                           "flops_per_image": {}, "count_s": {}}
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    for form in forms:
        model, shapes = abstract_model(variant, form, lowering)
        out["params"][form] = common.param_count(shapes["params"])
        t0 = time.perf_counter()
        ca = jax.jit(lambda v, xx: model.apply(v, xx, train=False)).lower(shapes, x).compile().cost_analysis()
        if isinstance(ca, (list, tuple)):  # older jax
            ca = ca[0]
        flops = float(ca["flops"])
        out["flops_per_image"][form] = flops
        out["gmacs"][form] = flops / 2 / 1e9
        out["count_s"][form] = time.perf_counter() - t0
        out.setdefault("conv_dot_gmacs", {})[form] = forward_macs(model, shapes, image_size) / 1e9
    return out


def run_flops(variants: Sequence[str] = ("t8", "t12", "s12", "sa12", "sa24", "sa36", "ma36"),
              image_size: int = 256) -> Dict[str, Any]:
    from fastvit_variants import (
        MOBILECLIP_GMACS,
        OFFICIAL_GMACS,
        OFFICIAL_PARAM_COUNTS,
        PAPER_NUMBERS,
        TIMM_MOBILECLIP_PARAM_COUNTS,
    )

    reference_params = {**OFFICIAL_PARAM_COUNTS, **TIMM_MOBILECLIP_PARAM_COUNTS}
    reference_gmacs = {**OFFICIAL_GMACS, **MOBILECLIP_GMACS}
    no_paper = (float("nan"),) * 3  # the MobileCLIP paper reports CLIP results, not ImageNet-1k classifiers
    rows: List[Dict[str, Any]] = []
    for v in variants:
        common.log(f"[flops] {v}")
        c = count_variant(v, image_size)
        official_params, official_gmacs, paper = reference_params[v], reference_gmacs[v], PAPER_NUMBERS.get(v, no_paper)
        rows.append({
            "variant": v, "image_size": image_size,
            "params_unfused": c["params"]["unfused"], "params_fused": c["params"]["fused"],
            "official_params_unfused": official_params[0], "official_params_fused": official_params[1],
            "paper_params_m": paper[0],
            "xla_gmacs_unfused": c["gmacs"]["unfused"], "xla_gmacs_fused": c["gmacs"]["fused"],
            "conv_dot_gmacs_unfused": c["conv_dot_gmacs"]["unfused"], "conv_dot_gmacs_fused": c["conv_dot_gmacs"]["fused"],
            "official_gmacs_unfused": official_gmacs[0], "official_gmacs_fused": official_gmacs[1],
            "paper_gmacs": paper[1], "paper_top1": paper[2],
            "flops_per_image_unfused": c["flops_per_image"]["unfused"],
            "flops_per_image_fused": c["flops_per_image"]["fused"],
        })
    return {"rows": rows, "settings": {"image_size": image_size, "lowering": "native",
                                       "method": "compile().cost_analysis()['flops'] / 2, batch 1"}}


def flops_lookup(result: Optional[Dict[str, Any]]) -> Dict:
    """{(variant, form): GFLOP per image} for MFU in the other benchmarks: 2 x the conv+dot
    multiply-accumulates of the jaxpr (the model's arithmetic, the same on every backend).

    Not XLA's cost analysis: on GPU it does not count the convolutions that XLA hands to cuDNN
    (seen on an H200 with jax 0.11.2: 0.020 GMACs for t8 against the jaxpr's 0.690)."""
    out = {}
    for r in (result or {}).get("rows", []):
        for form in ("fused", "unfused"):
            out[(r["variant"], form)] = 2 * r[f"conv_dot_gmacs_{form}"]
    return out


def _one_decimal(x: float) -> str:
    return "–" if x != x else f"{x:.1f}"  # NaN: no paper number (MobileCLIP towers)


def markdown(result: Dict[str, Any]) -> str:
    rows = []
    for r in result["rows"]:
        rows.append([
            r["variant"],
            f"{r['params_unfused'] / 1e6:.3f} / {r['params_fused'] / 1e6:.3f}",
            f"{r['official_params_unfused'] / 1e6:.3f} / {r['official_params_fused'] / 1e6:.3f}",
            "✓" if (r["params_unfused"], r["params_fused"]) == (r["official_params_unfused"],
                                                                  r["official_params_fused"]) else "✗",
            _one_decimal(r["paper_params_m"]),
            f"{r['xla_gmacs_unfused']:.3f} / {r['xla_gmacs_fused']:.3f}",
            f"{r['conv_dot_gmacs_unfused']:.3f} / {r['conv_dot_gmacs_fused']:.3f}",
            f"{r['official_gmacs_unfused']:.3f} / {r['official_gmacs_fused']:.3f}",
            _one_decimal(r["paper_gmacs"]), _one_decimal(r["paper_top1"]),
        ])
    head = ["variant", "params M (ours: train / fused)", "official code", "exact", "paper M",
            f"GMACs XLA cost analysis @{result['settings']['image_size']} (train / fused)",
            "conv+dot GMACs (jaxpr)", "official GMACs", "paper GMACs",
            "paper top-1"]
    return common.markdown_table(head, rows)


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastvit_variants import ALL_VARIANTS

    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS))
    p.add_argument("--image_size", type=int, default=256)
    args = p.parse_args(argv)
    print(markdown(run_flops(args.variants, args.image_size)))


if __name__ == "__main__":
    main()
