"""PNG charts of a benchmark report (the JSON that ``benchmarks.run`` writes).

    python -m benchmarks.plots benchmarks/results/latest-quick.json benchmarks/results   # charts of a saved run
    python -m benchmarks.plots a.json b.json OUTDIR --prefix gpu   # several reports of one machine, merged

Charts, each written only when the report has the section:

- ``<prefix>-inference.png``: img/s per variant, fused and unfused, one bar per implementation
  (JAX, PyTorch eager NCHW, PyTorch eager channels_last, torch.compile when timed); one panel per batch.
- ``<prefix>-train.png``: training-step img/s per variant and implementation.
- ``<prefix>-profile.png``: per-block time of the fused forward (ms per call), JAX against PyTorch,
  one panel per variant.

Every chart names the device (CPU model and cores, or the accelerator), the date and the commit of the run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (summary key, legend label, colour) in drawing order
IMPLEMENTATIONS = (
    ("jax_img_s", "JAX (jax.jit)", "#1f77b4"),
    ("torch_nchw_img_s", "PyTorch eager, NCHW", "#ff7f0e"),
    ("torch_cl_img_s", "PyTorch eager, channels_last", "#2ca02c"),
    ("torch_compile_img_s", "torch.compile", "#9467bd"),
)
PROFILE_IMPLS = (("jax", "JAX (each piece jitted)", "#1f77b4"), ("torch_nchw", "PyTorch eager, NCHW", "#ff7f0e"),
                 ("torch_cl", "PyTorch eager, channels_last", "#2ca02c"))
SHORT = {"jax": "JAX", "torch_nchw": "NCHW", "torch_cl": "channels_last"}
PROFILE_PIECES = ("stem", "stage 0", "stage 1", "stage 2", "stage 3", "final_conv + head")


def device_label(machine: Dict) -> str:
    """'AMD EPYC, 2 cores' on CPU; the accelerator's name (and its host CPU) otherwise."""
    cpu = f"{machine.get('cpu_model', '?')}, {machine.get('cpu_cores', '?')} cores"
    devices = sorted(set(machine.get("jax_devices") or []))
    if machine.get("jax_backend", "cpu") != "cpu" and devices:
        return f"{', '.join(devices)} (host: {cpu})"
    return cpu


def run_label(machine: Dict) -> str:
    """'<device>, 2026-11-26, commit 7f4632f'."""
    date = str(machine.get("date", "?"))[:10]
    commit = machine.get("git_commit")
    return f"{device_label(machine)}, {date}" + (f", commit {commit}" if commit else "")


def _bars(ax, groups: Sequence[str], series: List[tuple], ylabel: str, fmt: str = "{:.0f}") -> None:
    """Grouped vertical bars: series = [(label, colour, [value or None per group])]."""
    n = len(series)
    width = min(0.8 / max(n, 1), 0.3)
    for i, (label, colour, values) in enumerate(series):
        xs = [g + (i - (n - 1) / 2) * width for g in range(len(groups))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pts:
            continue
        bars = ax.bar([p[0] for p in pts], [p[1] for p in pts], width, label=label, color=colour)
        labels = [fmt.format(p[1]) for p in pts]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2,
                     rotation=90 if max(len(t) for t in labels) > 4 else 0)  # long numbers side by side
    ax.set_xlim(-0.6, len(groups) - 0.4)
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.margins(y=0.18)


def _finish(fig, axes, title: str) -> None:
    """Title on top, one legend for all panels below them."""
    handles, labels = axes[0].get_legend_handles_labels()
    fig.suptitle(title, fontsize=10)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))


def inference_figure(report: Dict):
    """img/s per variant and form, one bar per implementation; one panel per batch size."""
    summary = report["sections"]["inference"]["summary"]
    batches = sorted({r["batch"] for r in summary})
    keys = [k for k in IMPLEMENTATIONS if any(r.get(k[0]) for r in summary)]
    fig, axes = plt.subplots(1, len(batches), figsize=(max(7.0, 4.5 * len(batches)), 4.4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        rows = [r for r in summary if r["batch"] == batch]
        groups = [f"{r['variant']}\n{r['form']}" for r in rows]
        _bars(ax, groups, [(label, colour, [r.get(key) for r in rows]) for key, label, colour in keys],
              "images per second (higher is better)")
        size = rows[0].get("image_size", report.get("config", {}).get("image_size"))
        ax.set_xlabel(f"variant and form (batch {batch}, {size}×{size} px)")
    _finish(fig, axes[0], f"Inference throughput: {run_label(report['machine'])}")
    return fig


def train_figure(report: Dict):
    """Training-step img/s (forward + backward + AdamW) per variant and implementation."""
    summary = report["sections"]["train"]["summary"]
    keys = [k for k in IMPLEMENTATIONS if any(r.get(k[0]) for r in summary)]
    fig, ax = plt.subplots(figsize=(max(6.5, 2.5 * len(summary) + 2.5), 4.4))
    groups = [f"{r['variant']}\nbatch {r['batch']}, {r.get('image_size', '?')} px" for r in summary]
    _bars(ax, groups, [(label, colour, [r.get(key) for r in summary]) for key, label, colour in keys],
          "images per second (higher is better)", fmt="{:.1f}")
    ax.set_xlabel("variant (train form, BatchNorm in train mode)")
    _finish(fig, [ax], f"Training step (fwd + bwd + AdamW): {run_label(report['machine'])}")
    return fig


def profile_figure(report: Dict):
    """Per-block time of the fused forward (ms per call), JAX against PyTorch; one panel per variant."""
    rows = report["sections"]["profile"]["rows"]
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    by = {(r["variant"], r["piece"], r["impl"]): r["median_ms"] for r in rows}
    impls = [i for i in PROFILE_IMPLS if any(k[2] == i[0] for k in by)]
    fig, axes = plt.subplots(1, len(variants), figsize=(max(7.0, 5.5 * len(variants)), 4.4), squeeze=False)
    for ax, variant in zip(axes[0], variants):
        pieces = [p for p in PROFILE_PIECES if any((variant, p, i[0]) in by for i in impls)]
        batch = next(r["batch"] for r in rows if r["variant"] == variant)
        _bars(ax, [p.replace("final_conv + head", "final conv\n+ head") for p in pieces],
              [(label, colour, [by.get((variant, p, impl)) for p in pieces]) for impl, label, colour in impls],
              "milliseconds per call (lower is better)", fmt="{:.1f}")
        whole = ", ".join(f"{SHORT[impl]} {by[(variant, 'whole network', impl)]:.1f}"
                          for impl, _, _ in impls if (variant, "whole network", impl) in by)
        ax.set_title(f"{variant}, fused, batch {batch}" + (f"\nwhole network, ms: {whole}" if whole else ""),
                     fontsize=9)
        ax.set_xlabel("piece of the network (each called on its own)")
    _finish(fig, axes[0], f"Per-block time, fused forward: {run_label(report['machine'])}")
    return fig


CHARTS = (("inference", inference_figure), ("train", train_figure), ("profile", profile_figure))


def write_charts(report: Dict, outdir: str, prefix: str) -> List[str]:
    """Write ``<outdir>/<prefix>-<section>.png`` for each charted section the report has; returns the paths."""
    os.makedirs(outdir, exist_ok=True)
    paths = []
    for section, make in CHARTS:
        sec = report.get("sections", {}).get(section)
        if not sec or not (sec.get("summary") or sec.get("rows")):
            continue
        fig = make(report)
        path = os.path.join(outdir, f"{prefix}-{section}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def merge_reports(reports: Sequence[Dict]) -> Dict:
    """One report from several runs of one machine (e.g. one JSON per variant): rows and summaries
    concatenated per section; machine and config of the first."""
    merged = {k: v for k, v in reports[0].items() if k != "sections"}
    merged["sections"] = {}
    for rep in reports:
        for name, sec in rep.get("sections", {}).items():
            out = merged["sections"].setdefault(name, {})
            for key in ("rows", "summary"):
                if isinstance(sec.get(key), list):
                    out.setdefault(key, []).extend(sec[key])
    return merged


def main(argv: Optional[Sequence[str]] = None) -> List[str]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="report JSON(s) written by benchmarks.run (several: merged)")
    p.add_argument("outdir", help="folder for the PNG files")
    p.add_argument("--prefix", default=None, help="file name prefix (default: the first JSON file's name)")
    args = p.parse_args(argv)
    reports = []
    for path in args.results:
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    report = merge_reports(reports) if len(reports) > 1 else reports[0]
    prefix = args.prefix or os.path.splitext(os.path.basename(args.results[0]))[0]
    paths = write_charts(report, args.outdir, prefix)
    for path in paths:
        print(path)
    return paths


if __name__ == "__main__":
    main(sys.argv[1:])
