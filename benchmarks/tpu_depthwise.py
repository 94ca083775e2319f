"""The TPU compiler's estimated cycles of one depthwise convolution, per channel count.

Compiles ``fastvit_jax.conv.conv2d`` (native lowering) as a depthwise KxK convolution over an
NHWC bfloat16 input for one TPU chip on this CPU host (deviceless, libtpu), forward and gradient
(input and kernel), and sums the compiler's estimated cycles of the instructions
(``fastvit_jax.training.hlo_cycles``). The TPU keeps the channel dimension on its 128 lanes, so a
channel count is paid for in whole blocks of 128: ma36's 76 and 152 channels cost what 128 and 256
do (docs/performance.md#where-the-tpu-step-goes). ESTIMATES from the compiled programs, for
comparing programs compiled by the same libtpu, not times::

    python -m benchmarks.tpu_depthwise --channels 64 76 128 152 256
    python -m benchmarks.tpu_depthwise --kernel 3 --size 32 --channels 152 256

Each compile takes seconds (the gradient at 32x64x64: up to a minute on a 2-core host).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Dict, List, Optional, Sequence

from benchmarks.tpu_estimates import ONE_CHIP

LANES = 128


def lane_occupancy(channels: int) -> float:
    """The fraction of the 128-lane blocks a channel count fills (76 -> 0.59)."""
    return channels / (LANES * -(-channels // LANES))


def compile_depthwise(device: Any, batch: int, size: int, channels: int, kernel: int) -> Dict[str, Any]:
    """Forward and gradient of a stride-1 'same' depthwise conv compiled for ``device``; their
    estimated cycles, bytes and FLOPs (XLA's cost analysis)."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    from fastvit_jax.conv import conv2d
    from fastvit_jax.training.aot import cost_per_chip
    from fastvit_jax.training.hlo_cycles import total_cycles

    def forward(x, w):
        return conv2d(x, w.astype(x.dtype), padding=kernel // 2, groups=channels, lowering="native")

    def gradient(x, w, g):
        return jax.vjp(forward, x, w)[1](g)

    place = SingleDeviceSharding(device)
    x = jax.ShapeDtypeStruct((batch, size, size, channels), jnp.bfloat16, sharding=place)
    w = jax.ShapeDtypeStruct((kernel, kernel, 1, channels), jnp.float32, sharding=place)
    row: Dict[str, Any] = {"batch": batch, "size": size, "channels": channels, "kernel": kernel,
                           "lane_occupancy": lane_occupancy(channels)}
    for name, fn, args in (("forward", forward, (x, w)), ("gradient", gradient, (x, w, x))):
        compiled = jax.jit(fn).lower(*args).compile()
        flops, nbytes = cost_per_chip(compiled)
        row[name] = {"estimated_cycles": total_cycles(compiled.as_text()), "bytes": nbytes, "flops": flops}
    return row


def markdown(rows: List[Dict[str, Any]], chip: str) -> str:
    first = rows[0]
    lines = [f"{first['kernel']}x{first['kernel']} depthwise conv, {first['batch']}x{first['size']}x{first['size']}xC "
             f"bfloat16, one {chip} chip (ESTIMATES from the compiled programs, not measurements)", "",
             "| channels | lanes filled | forward M cycles | gradient M cycles | forward MB (cost analysis) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['channels']} | {100 * r['lane_occupancy']:.0f}% "
                     f"| {r['forward']['estimated_cycles'] / 1e6:.3f} | {r['gradient']['estimated_cycles'] / 1e6:.3f} "
                     f"| {r['forward']['bytes'] / 1e6:.1f} |")
    return "\n".join(lines)


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--chip", default="v5e", choices=sorted(ONE_CHIP))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="height and width of the input")
    p.add_argument("--kernel", type=int, default=7)
    p.add_argument("--channels", type=int, nargs="+", default=[64, 76, 128, 152, 256])
    p.add_argument("--out", default=None, help="JSON file for the rows (default: print only)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    args = parse_args(argv)
    from fastvit_jax.training import aot

    aot.prepare_deviceless_tpu()
    device = aot.topology_devices(ONE_CHIP[args.chip])[0]
    rows = [compile_depthwise(device, args.batch, args.size, c, args.kernel) for c in args.channels]
    print(markdown(rows, args.chip))
    if args.out:
        aot.write_report({"chip": args.chip, "rows": rows}, args.out)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
