"""Where the TPU compiler expects a training step's time to go, per model scope.

Compiles the train step of one variant for one TPU chip on this CPU host (deviceless, libtpu:
``benchmarks.tpu_estimates.compile_row``, the trainer's own programs) and sums the compiler's
estimated cycles of its instructions per model scope and direction (``fastvit_jax.training.hlo_cycles``).
The roofline of ``tpu_estimates`` sees FLOPs and bytes; this sees work the compiler schedules
badly (a kernel with a poor layout, relayout copies), which is how the channel-multiplier convs'
gradient was found (docs/performance.md#channel-multiplier-convs-on-tpu). ESTIMATES from the
compiled program, for comparing programs compiled by the same libtpu, not times::

    nice python -m benchmarks.tpu_cycles --variant ma36 --image_size 256 --batch 32
    nice python -m benchmarks.tpu_cycles --variant t8 --image_size 64 --batch 16 --numerics before

A compile takes CPU minutes (t8 at 64 px: ~2, ma36 at 256 px: ~8-10 on a 2-core host).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.tpu_estimates import ONE_CHIP, Row, compile_row


def breakdown(hlo_text: str, top: int) -> Dict[str, Any]:
    """The program's total estimated cycles and its ``top`` scopes (direction, scope, cycles, share)."""
    from fastvit_jax.training.hlo_cycles import cycles_by_scope, total_cycles

    total = total_cycles(hlo_text) or 0
    scopes = [{"direction": d, "scope": s, "cycles": c, "share": c / total if total else 0.0}
              for d, s, c in cycles_by_scope(hlo_text)]
    return {"total_cycles": total, "scopes": scopes[:top], "scopes_left_out": max(0, len(scopes) - top)}


def markdown(result: Dict[str, Any]) -> str:
    lines = [f"{result['variant']}, {result['image_size']} px, {result['batch']} per {result['chip']} chip, "
             f"numerics {result['numerics']}, remat {result['remat']}: {result['total_cycles'] / 1e6:.2f} M estimated "
             f"cycles (ESTIMATES from the compiled program, not measurements)", "",
             "| direction | scope | M cycles | share |", "|---|---|---|---|"]
    lines += [f"| {s['direction']} | `{s['scope']}` | {s['cycles'] / 1e6:.3f} | {100 * s['share']:.1f}% |"
              for s in result["scopes"]]
    if result["scopes_left_out"]:
        lines.append(f"\n({result['scopes_left_out']} smaller scopes left out; --top)")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="t8")
    p.add_argument("--chip", default="v5e", choices=sorted(ONE_CHIP))
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--batch", type=int, default=32, help="images per chip")
    p.add_argument("--lowering", default="native", choices=["native", "shift"])
    p.add_argument("--remat", default="auto")
    p.add_argument("--numerics", default="today", choices=["today", "before"])
    p.add_argument("--top", type=int, default=30, help="scopes listed")
    p.add_argument("--out", default=None, help="JSON file for the result (default: print only)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    from fastvit_jax.training import aot

    aot.prepare_deviceless_tpu()  # before JAX starts
    texts: List[str] = []
    row = Row(args.variant, args.chip, args.lowering, args.remat, args.image_size, args.numerics)
    report = compile_row(row, args.batch, on_compiled=lambda name, compiled: texts.append(compiled.as_text()))
    result = {"variant": args.variant, "chip": args.chip, "image_size": args.image_size, "batch": args.batch,
              "lowering": args.lowering, "remat": report["remat"], "numerics": args.numerics,
              "note": "the TPU compiler's estimated cycles (an undocumented field of its output), summed per model "
                      "scope: ESTIMATES for comparing programs compiled by the same libtpu, not measurements",
              **breakdown(texts[0], args.top), "train_step": report["train_step"]}
    print(markdown(result))
    if args.out:
        aot.write_report(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
