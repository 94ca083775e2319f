#!/usr/bin/env python
"""Check this project against an installed timm: timm's FastViT state_dicts load into torch_ref
as they are, and convert to Flax variables that give timm's logits.

  python -m convert.check_timm [--variants t8 ... ma36 mci0 ... mci4] [--image_size 128] [--out report.json]

timm is not a dependency of the project (it does not install beside the pinned CPU torch); run
this where timm is installed. Nothing is downloaded: the models are timm's own random inits, made
non-trivial (layer scales drawn in [0.2, 0.6], random BN affines, BN statistics calibrated by
train-mode passes) through torch_ref, whose state_dict then goes back into timm.

Every variant by default: the seven base models and the MobileCLIP towers ``fastvit_mci0`` ...
``fastvit_mci4`` (built here with 1000 classes; ``--image_size`` must be divisible by 64 for the
five-stage mci3/mci4).

Per variant, all in float32 on the CPU (NCHW for torch, NHWC for JAX):
  1. timm's state_dict keys and shapes == torch_ref's (train form); ``load_state_dict(strict=True)``
     both ways.
  2. logits: timm vs torch_ref, train form, eval mode.
  3. both fused (timm's ``reparameterize()`` per module, ``torch_ref.reparameterize_model``):
     timm's fused state_dict keys/shapes == torch_ref's inference_mode model; logits agree.
  4. ``convert.core.convert_state_dict`` of timm's unfused and fused state_dicts -> JAX logits
     (unfused, fused on the torch side, fused on the JAX side) vs timm's.
Exit code 1 if any check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Sequence

import numpy as np

TOLERANCE = 1e-4  # max |Δlogit| / max |logit| (float32, same weights)


def _shapes(sd) -> Dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def _diff_keys(found: Dict[str, tuple], expected: Dict[str, tuple]) -> Dict[str, List]:
    return {"only_in_timm": sorted(set(found) - set(expected))[:10],
            "only_in_torch_ref": sorted(set(expected) - set(found))[:10],
            "shape_mismatch": [(k, found[k], expected[k]) for k in sorted(set(found) & set(expected))
                               if found[k] != expected[k]][:10]}


def check_variant(variant: str, image_size: int = 128, batch: int = 2) -> Dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import timm
    import torch

    import fastvit_jax
    import torch_ref
    from convert.core import convert_state_dict
    from fastvit_jax.compare import relative_error
    from torch_ref.testing import make_nontrivial

    t0 = time.perf_counter()
    res: Dict[str, Any] = {"variant": variant, "checks": {}}
    torch.manual_seed(0)
    tm = timm.create_model(f"fastvit_{variant}", pretrained=False, num_classes=1000).eval()
    ours = torch_ref.create_model(variant, num_classes=1000).eval()
    diff = _diff_keys(_shapes(tm.state_dict()), _shapes(ours.state_dict()))
    res["checks"]["train_keys_match"] = not any(diff.values())
    if any(diff.values()):
        res["train_key_diff"] = diff
        return res
    ours.load_state_dict(tm.state_dict(), strict=True)  # timm -> torch_ref as it is
    make_nontrivial(ours, seed=1, image_size=64, batch=2, passes=1)
    tm.load_state_dict(ours.state_dict(), strict=True)  # and back
    tm.eval()

    x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y_timm = tm(x).numpy()
        y_ours = ours(x).numpy()
    res["rel_err"] = {"torch_ref_vs_timm_unfused": relative_error(y_ours, y_timm)}

    tm_fused = torch_ref.reparameterize_model(tm)  # a copy; each timm module fuses itself (reparameterize())
    ours_fused = torch_ref.reparameterize_model(ours)
    fused_sd = tm_fused.state_dict()
    empty_fused = torch_ref.create_model(variant, num_classes=1000, inference_mode=True)
    fdiff = _diff_keys(_shapes(fused_sd), _shapes(empty_fused.state_dict()))
    res["checks"]["fused_keys_match"] = not any(fdiff.values())
    if any(fdiff.values()):
        res["fused_key_diff"] = fdiff
    else:
        empty_fused.load_state_dict(fused_sd, strict=True)
        with torch.no_grad():
            res["rel_err"]["torch_ref_loads_timm_fused"] = relative_error(empty_fused.eval()(x).numpy(), y_timm)
    with torch.no_grad():
        y_timm_fused = tm_fused(x).numpy()
        res["rel_err"]["timm_fused_vs_timm_unfused"] = relative_error(y_timm_fused, y_timm)
        res["rel_err"]["torch_ref_fused_vs_timm_fused"] = relative_error(ours_fused(x).numpy(), y_timm_fused)

    x_nhwc = jnp.asarray(x.numpy().transpose(0, 2, 3, 1))
    for name, sd, fused in (("jax_unfused_from_timm", tm.state_dict(), False),
                            ("jax_fused_on_jax_side", tm.state_dict(), True),
                            ("jax_from_timm_fused", fused_sd, True)):
        conv = convert_state_dict(sd, variant=variant, fused=fused)
        model = fastvit_jax.create_model(variant, num_classes=1000, inference_mode=conv.form == "fused")
        y = jax.jit(lambda v, xx, m=model: m.apply(v, xx, train=False))(conv.variables, x_nhwc)
        res["rel_err"][f"{name}_vs_timm"] = relative_error(np.array(y), y_timm)
    res["checks"]["logits_within_tolerance"] = all(v <= TOLERANCE for v in res["rel_err"].values())
    res["logit_std"] = float(np.std(y_timm))
    res["seconds"] = time.perf_counter() - t0
    return res


def run(variants: Sequence[str], image_size: int = 128) -> Dict[str, Any]:
    import timm
    import torch

    report: Dict[str, Any] = {"timm": timm.__version__, "torch": torch.__version__, "tolerance": TOLERANCE,
                              "image_size": image_size, "variants": []}
    for v in variants:
        try:
            r = check_variant(v, image_size)
        except Exception as e:  # noqa: BLE001 - report and go on with the next variant
            r = {"variant": v, "checks": {"ran": False}, "error": f"{type(e).__name__}: {e}"[:500]}
        report["variants"].append(r)
        print(f"{v}: {'ok' if all(r['checks'].values()) else 'FAILED'} "
              + " ".join(f"{k}={val:.1e}" for k, val in r.get("rel_err", {}).items())
              + (f" error={r['error']}" if "error" in r else ""), flush=True)
    report["ok"] = all(all(r["checks"].values()) for r in report["variants"])
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from fastvit_variants import ALL_VARIANTS

    p.add_argument("--variants", nargs="+", default=list(ALL_VARIANTS))
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--out", default=None, help="write the report as JSON here")
    args = p.parse_args(argv)
    try:
        import timm  # noqa: F401
    except ImportError:
        print("error: convert.check_timm compares with an installed timm, and timm is not installed here (it is not "
              "a dependency: it needs a torchvision that matches your torch); run it where `import timm` works",
              file=sys.stderr)
        return 2
    report = run(args.variants, args.image_size)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print("all checks passed" if report["ok"] else "SOME CHECKS FAILED")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
