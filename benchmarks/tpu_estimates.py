"""The training step on one TPU chip, estimated from the compiled program: the largest per-chip
batch that fits the chip's HBM, and the img/s per chip and MFU the roofline gives at that batch.

Each figure is a deviceless compile with libtpu on this CPU host (``train_tpu.py --compile_only``'s
code: ``fastvit_jax.training.aot``), one chip, data-parallel mesh (a data-parallel step's per-chip
figures barely depend on the chip count), train step only. Per row: compile at two batch sizes,
fit the step's memory as a + b * batch (parameters and optimizer state are the constant, the
activations and temporaries grow with the batch), compile the largest multiple of 8 under the
HBM, and refine the fit with each compile (``largest_batch``). ESTIMATES from XLA's cost
and memory analysis against the chip's published peak and bandwidth, not measurements. Beside
the roofline, the TPU compiler's own estimated cycles as img/s and MFU where the chip's clock is
known (v5e; ``aot.cycle_time``): the roofline prices vector-unit work at the MXUs' peak, so for
FastViT's depthwise convolutions the two can differ by 2x or more (docs/performance.md).

``--numerics before`` compiles the step as it was before the accelerator work (float32-result
convs, two-pass BatchNorm statistics, autodiff's gradient of the channel-multiplier convs, no
remat; ``benchmarks/baseline_numerics.py``
swaps them in while the step is traced), so one checkout gives both sides of a before/after row.

A compile takes minutes of CPU (t8 at 256 px: ~5-10 CPU-minutes, ma36 several times that), so
every compile is cached in --results, keyed by the code (git tree of fastvit_jax/), variant,
chip, lowering, remat, image size and batch; a rerun compiles only what is missing. Run it
niced, in the background; a subset with the flags::

    nice python -m benchmarks.tpu_estimates --variants t8 ma36 --chips v5e
    python -m benchmarks.tpu_estimates --table          # the markdown table from the cache only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_RESULTS = os.path.join(REPO, "benchmarks", "results", "tpu_estimates.json")
# The smallest slice libtpu builds per chip (v4/v5p: one megacore chip).
ONE_CHIP = {"v5e": "v5e:1x1", "v6e": "v6e:1x1", "v4": "v4:1x1x1", "v5p": "v5p:1x1x1"}
BATCH_MULTIPLE = 8
MAX_REFINES = 3  # compiles after the two probes, per row
# A refinement assumes at least this fraction of the probes' memory per image: near the HBM limit
# the TPU compiler rematerialises on its own and the memory can stay flat over a few batches
# (ma36 on v5e: 14.22 GiB at 80, 14.25 at 88), which a straight fit would fling far out (616).
MIN_SLOPE_FRACTION = 0.5


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table: a variant's train step on one chip."""

    variant: str
    chip: str
    lowering: str = "native"
    remat: str = "auto"
    image_size: int = 256
    numerics: str = "today"  # or 'before' (benchmarks/baseline_numerics.py; remat 'none')


def code_label() -> str:
    """The git tree of fastvit_jax/ (changes only when the model/trainer code does), '+dirty' if edited."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True).stdout.strip()

    tree = git("rev-parse", "HEAD:fastvit_jax")[:12] or "unknown"
    return tree + ("+dirty" if git("status", "--porcelain", "--", "fastvit_jax") else "")


def cache_key(label: str, row: Row, batch: int) -> str:
    key = f"{label}|{row.variant}|{row.chip}|{row.lowering}|{row.remat}|{row.image_size}|{batch}"
    return key if row.numerics == "today" else f"{key}|{row.numerics}"


def load_results(path: str) -> Dict[str, Any]:
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def save_results(path: str, results: Dict[str, Any]) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def compile_one(row: Row, batch: int, timeout_s: float) -> Dict[str, Any]:
    """The train step of ``row`` at ``batch`` per chip, compiled in a child process (libtpu must be
    set up before JAX starts); its report plus the child's CPU seconds."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.tpu_estimates", "--_one",
                           json.dumps({**dataclasses.asdict(row), "batch": batch})],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        report = out_of_memory_report(proc.stderr)
        if report is None:
            raise RuntimeError(f"compile of {row} at batch {batch} failed:\n{proc.stderr[-2000:]}")
    else:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    report["cpu_s"] = round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1)
    report["wall_s"] = round(time.perf_counter() - start, 1)
    return report


def out_of_memory_report(stderr: str) -> Optional[Dict[str, Any]]:
    """A compile the TPU compiler refused for want of HBM, as a report that does not fit (its memory:
    what the compiler says the temporaries need, a lower bound of the step's); None for other errors."""
    match = re.search(r"RESOURCE_EXHAUSTED: Ran out of memory .*?\(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                      stderr)
    if match is None:
        return None
    needed, available = (int(float(g) * 2**30) for g in match.groups())
    return {"out_of_memory": match.group(0), "available_bytes": available,
            "train_step": {"memory_bytes": {"total": needed}, "fits": False}}


def compile_row(row: Row, batch: int, on_compiled: Optional[Callable[[str, Any], None]] = None) -> Dict[str, Any]:
    """In this process, with libtpu prepared (``aot.prepare_deviceless_tpu`` before JAX starts): the
    train step of ``row`` at ``batch`` per chip compiled for one chip, and its report.
    ``on_compiled(step_name, compiled)`` receives the compiled program."""
    from fastvit_jax.training import aot

    import fastvit_jax
    from fastvit_jax.training.config import get_config

    config = get_config(row.variant, global_batch_size=batch, image_size=row.image_size,
                        remat=row.remat, mesh="data:-1", workdir="/nonexistent")
    numerics = contextlib.nullcontext()
    if row.numerics == "before":
        from benchmarks.baseline_numerics import baseline_numerics

        numerics = baseline_numerics()
    with numerics:  # the step is traced inside compile_only
        report = aot.compile_only(config, ONE_CHIP[row.chip], fastvit_jax.create_model,
                                  lowering=row.lowering, steps=("train_step",), on_compiled=on_compiled)
    report["numerics"] = row.numerics
    return report


def _one(spec: Dict[str, Any]) -> None:
    """Child: compile and print the report as one JSON line."""
    from fastvit_jax.training import aot

    aot.prepare_deviceless_tpu()
    fields = {f.name for f in dataclasses.fields(Row)}
    print(json.dumps(compile_row(Row(**{k: v for k, v in spec.items() if k in fields}), spec["batch"])))


def fit_max_batch(points: Sequence[Tuple[int, int]], hbm_bytes: int) -> int:
    """The largest multiple of 8 whose linearly extrapolated memory (from (batch, bytes) points) fits."""
    (b1, m1), (b2, m2) = sorted(points)[:2]
    per_image = (m2 - m1) / (b2 - b1)
    if per_image <= 0:
        raise ValueError(f"memory does not grow with the batch: {points}")
    fixed = m1 - per_image * b1
    return max(BATCH_MULTIPLE, int((hbm_bytes - fixed) / per_image) // BATCH_MULTIPLE * BATCH_MULTIPLE)


class Runner:
    """Compiles what the cache lacks, saving after every compile."""

    def __init__(self, path: str, label: str, timeout_s: float, dry_run: bool = False):
        self.path, self.label, self.timeout_s, self.dry_run = path, label, timeout_s, dry_run
        self.results = load_results(path)

    def get(self, row: Row, batch: int) -> Optional[Dict[str, Any]]:
        key = cache_key(self.label, row, batch)
        if key not in self.results:
            if self.dry_run:
                return None
            print(f"compiling {row.variant} {row.lowering} ({row.numerics}) on {row.chip} at {batch}/chip ...",
                  flush=True)
            report = compile_one(row, batch, self.timeout_s)
            step = report["train_step"]
            if "out_of_memory" in report:
                print(f"  does not fit: {report['out_of_memory']}", flush=True)
            else:
                print(f"  {step['memory_bytes']['total'] / 2**30:.2f} GiB, {step['img_per_s_per_chip']:.0f} img/s, "
                      f"CPU {report['cpu_s']:.0f}s, wall {report['wall_s']:.0f}s", flush=True)
            self.results = {**load_results(self.path), key: report}  # another run may have added entries
            save_results(self.path, self.results)
        return self.results[key]


def largest_batch(runner: Runner, row: Row, probes: Sequence[int], refines: int = MAX_REFINES) -> Dict[str, Any]:
    """The row's summary: the largest compiled batch whose step fits the chip's HBM.

    Compile at the two ``probes``, extrapolate the memory linearly to the HBM, compile that batch,
    then refine: fit again through the two compiled batches that bracket the limit best (the
    largest that fits and the smallest that does not, else the two largest) and compile the new
    prediction, until no untried multiple of 8 lies between them (at most ``refines`` compiles
    after the probes). XLA's memory does not grow exactly linearly with the batch, so the first
    prediction can stop well under the HBM or overshoot it, and a refinement never assumes less
    than ``MIN_SLOPE_FRACTION`` of the probes' memory per image. A compile the TPU compiler refuses
    for want of HBM does not fit; the memory it says it needed joins the fit, and the HBM it says
    is available becomes the limit.
    """
    reports = {b: runner.get(row, b) for b in probes}
    if any(r is None for r in reports.values()):
        return {"row": row, "missing": True}
    chip_hbm = [r["train_step"]["hbm_bytes"] for r in reports.values() if "out_of_memory" not in r]
    if not chip_hbm:  # even the probes do not fit
        return {"row": row, "missing": True}
    hbm = chip_hbm[0]

    def limit() -> int:
        return min([hbm] + [r["available_bytes"] for r in reports.values() if "out_of_memory" in r])

    def total(batch: int) -> int:
        return reports[batch]["train_step"]["memory_bytes"]["total"]

    def fits(batch: int) -> bool:
        return "out_of_memory" not in reports[batch] and total(batch) <= limit()

    low, high = sorted(probes)[:2]
    probe_slope = (total(high) - total(low)) / (high - low)
    predicted, untried = None, None
    for _ in range(refines):
        below = [b for b in reports if fits(b)]
        above = [b for b in reports if not fits(b)]
        pair = [max(below), min(above)] if below and above else sorted(reports)[-2:]
        try:
            predicted = fit_max_batch([(b, total(b)) for b in pair], limit())
        except ValueError:  # the memory did not grow between the two batches: keep what was compiled
            break
        if above:  # stay strictly between the largest batch that fits and the smallest that does not
            predicted = min(predicted, min(above) - BATCH_MULTIPLE)
        if below and probe_slope > 0:  # the same fit from the largest batch that fits, at the floor slope
            top = max(below)
            floor_fit = fit_max_batch([(top, total(top)), (top + 1, total(top) + MIN_SLOPE_FRACTION * probe_slope)],
                                      limit())
            predicted = min(predicted, max(top + BATCH_MULTIPLE, floor_fit))
        if predicted in reports or (below and predicted <= max(below)):
            break
        report = runner.get(row, predicted)
        if report is None:  # not in the cache (--table): the row stops at what was compiled
            untried = predicted
            break
        reports[predicted] = report
    fitting = [b for b in reports if fits(b)]
    if not fitting:
        return {"row": row, "missing": True, "predicted_batch": predicted}
    batch = max(fitting)
    return {"row": row, "batch": batch, "report": reports[batch], "predicted_batch": predicted, "untried": untried,
            "compiled_batches": sorted(reports), "cpu_s": sum(r.get("cpu_s", 0.0) for r in reports.values())}


def table(summaries: List[Dict[str, Any]]) -> str:
    """The markdown table of the rows (per chip; estimates)."""
    from fastvit_jax.training.aot import CHIPS, cycle_time

    lines = ["| variant | convs | chip | largest batch/chip | memory (GiB of HBM) | GFLOP/img | MB/img | step (ms) "
             "| bound | img/s/chip | MFU | compiler's cycles: img/s/chip, MFU | CPU compile (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s in summaries:
        row = s["row"]
        convs = row.lowering if row.numerics == "today" else f"{row.lowering}, {row.numerics} (remat {row.remat})"
        if s.get("missing"):
            lines.append(f"| {row.variant} | {convs} | {row.chip} | not compiled yet"
                         f"{' (predicted ' + str(s['predicted_batch']) + ')' if 'predicted_batch' in s else ''} "
                         f"| | | | | | | | | |")
            continue
        step, batch = s["report"]["train_step"], s["batch"]
        m = step["memory_bytes"]
        largest = f"{batch}" if s.get("untried") is None else f"{batch} ({s['untried']} not compiled yet)"
        by_cycles = cycle_time(step.get("estimated_cycles"), step["flops"], CHIPS[row.chip], batch)
        cycles_cell = (f"{by_cycles['cycles_img_per_s_per_chip']:,.0f}, {100 * by_cycles['cycles_mfu']:.1f}%"
                       if by_cycles else "n/a")
        lines.append(
            f"| {row.variant} | {convs} | {row.chip} | {largest} | {m['total'] / 2**30:.1f} of "
            f"{step['hbm_bytes'] / 2**30:.0f} | {step['flops'] / batch / 1e9:.1f} | "
            f"{step['bytes_accessed'] / batch / 1e6:.0f} | {step['step_s'] * 1e3:.0f} | {step['bound']} | "
            f"{step['img_per_s_per_chip']:,.0f} | {100 * step['mfu']:.1f}% | {cycles_cell} | {s['cpu_s'] / 60:.0f} |")
    return "\n".join(lines)


def rows_for(variants: Sequence[str], chips: Sequence[str], lowerings: Sequence[str], shift_for: Sequence[str],
             remat: str, image_size: int, numerics: Sequence[str] = ("today",)) -> List[Row]:
    """Native convs for every variant; 'shift' as well for the variants in ``shift_for``; each in every
    ``numerics`` ('before' rows with no remat, as the step was)."""
    rows = []
    for chip in chips:
        for variant in variants:
            for lowering in lowerings:
                if lowering == "native" or variant in shift_for:
                    for kind in numerics:
                        rows.append(Row(variant, chip, lowering, "none" if kind == "before" else remat, image_size,
                                        kind))
    return rows


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12", "ma36"])
    p.add_argument("--chips", nargs="+", default=["v5e", "v4"], choices=sorted(ONE_CHIP))
    p.add_argument("--lowerings", nargs="+", default=["native", "shift"], choices=["native", "shift"])
    p.add_argument("--shift_for", nargs="+", default=["t8"], help="variants also compiled with the 'shift' lowering")
    p.add_argument("--remat", default="auto", help="the trainer's --remat (auto: its TPU default)")
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--numerics", nargs="+", default=["today"], choices=["today", "before"],
                   help="'before': the step as it was before the accelerator work (baseline_numerics, no remat)")
    p.add_argument("--probe_batches", nargs=2, type=int, default=[16, 32], metavar=("B1", "B2"),
                   help="per-chip batches the memory is extrapolated from")
    p.add_argument("--results", default=DEFAULT_RESULTS, help="the cache of compiles (JSON)")
    p.add_argument("--label", default=None, help="code label of the cache entries (default: git tree of fastvit_jax/)")
    p.add_argument("--timeout_s", type=float, default=4 * 3600, help="per compile")
    p.add_argument("--table", action="store_true", help="print the table from the cache only, compile nothing")
    p.add_argument("--_one", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args._one:
        _one(json.loads(args._one))
        return 0
    label = args.label or code_label()
    runner = Runner(args.results, label, args.timeout_s, dry_run=args.table)
    rows = rows_for(args.variants, args.chips, args.lowerings, args.shift_for, args.remat, args.image_size,
                    args.numerics)
    summaries = []
    for row in rows:
        try:
            summaries.append(largest_batch(runner, row, args.probe_batches))
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            print(f"error: {e}", file=sys.stderr)
            summaries.append({"row": row, "missing": True})
    print(f"\nTraining step per chip at {args.image_size} px, code {label} (ESTIMATES from the compiled programs, "
          f"not measurements):\n")
    print(table(summaries))
    return 0


if __name__ == "__main__":
    sys.exit(main())
