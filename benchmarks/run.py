"""Run the benchmark suite, write JSON under benchmarks/results/, print a Markdown report.

    python -m benchmarks.run --quick     # `make bench`: t8 + sa12, batch 8, 256 px (a few minutes on 2 cores)
    python -m benchmarks.run --full      # all twelve variants (MobileCLIP towers included), batches 1/8/32,
                                         # more repeats (long on a CPU)

Sections: params/GMACs (XLA cost analysis, 'native' lowering), inference (JAX vs torch_ref,
fused and unfused), per-block profile, training step, input pipeline, deploy runtimes (JAX,
ONNX Runtime, LiteRT, PyTorch on the fused model). The same command runs
on a GPU/TPU host (JAX bfloat16, torch CUDA autocast; MFU from the jaxpr's conv+dot count and
``--peak_tflops`` or the table in ``benchmarks.common``).

Beside the JSON it writes PNG charts (``benchmarks.plots``): img/s per variant and implementation,
fused and unfused; the training step; the per-block time, JAX against PyTorch.

Numbers on a shared machine are noisy: every section records the load average before and
after; implementations are timed round-robin so ratios are fairer than absolute numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from benchmarks import common  # noqa: E402
from fastvit_variants import ALL_VARIANTS, VARIANTS  # noqa: E402  (pure Python)

# --quick keeps the params/GMACs table to the seven base variants (compiling mci3/mci4 at 256 px
# for XLA's cost analysis takes minutes on a CPU); --full has all twelve, MobileCLIP towers included.
QUICK = dict(variants=["t8", "sa12"], batch_sizes=[8], image_size=256, repeats=10, train_repeats=5,
             train_variants=["t8"], profile_variants=["t8", "sa12"], flops_variants=list(VARIANTS))
FULL = dict(variants=list(ALL_VARIANTS), batch_sizes=[1, 8, 32], image_size=256,
            repeats=20, train_repeats=8, train_variants=["t8", "sa12", "mci0"], profile_variants=["t8", "sa12"],
            flops_variants=None)
SECTIONS = ("flops", "inference", "profile", "train", "pipeline", "deploy")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="default")
    mode.add_argument("--full", action="store_true")
    p.add_argument("--variants", nargs="+", default=None, help="inference variants (overrides the mode)")
    p.add_argument("--train_variants", nargs="+", default=None)
    p.add_argument("--batch_sizes", nargs="+", type=int, default=None)
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--skip", nargs="*", default=[], choices=SECTIONS)
    p.add_argument("--only", nargs="*", default=None, choices=SECTIONS)
    p.add_argument("--torch_compile", action="store_true",
                   help="also time torch.compile (inductor; compiles with a C++ toolchain, slow on 2 cores)")
    p.add_argument("--peak_tflops", type=float, default=None, help="accelerator peak for MFU (all devices)")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/<mode>-<utc time>.json)")
    p.add_argument("--data_dir", default=None, help="tfds dir for the demo data (input pipeline)")
    p.add_argument("--flops_variants", nargs="+", default=None,
                   help="params/GMACs table rows (default: the base seven with --quick, all twelve with --full)")
    p.add_argument("--profile_variants", nargs="+", default=None)
    p.add_argument("--profile_batch", type=int, default=8)
    p.add_argument("--pipeline_batch", type=int, default=32)
    p.add_argument("--pipeline_chunks", type=int, default=5)
    p.add_argument("--pipeline_threads", nargs="+", type=int, default=[1, 0],
                   help="tf.data thread counts to time (0 = all cores)")
    p.add_argument("--no_experiments", action="store_true", help="skip the extra JAX configurations")
    p.add_argument("--deploy_batch_sizes", nargs="+", type=int, default=[1, 8],
                   help="batches of the deploy-runtime latency table (JAX, ONNX Runtime, LiteRT, PyTorch)")
    p.add_argument("--lowering", choices=["native", "shift"], default=None,
                   help="force the JAX conv lowering (default: per backend, 'shift' on CPU)")
    return p.parse_args(argv)


def run(args) -> dict:
    cfg = dict(FULL if args.full else QUICK)
    mode = "full" if args.full else "quick"
    for k in ("variants", "batch_sizes", "image_size", "repeats", "train_variants", "flops_variants",
              "profile_variants"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    sections = [s for s in (args.only or SECTIONS) if s not in args.skip]
    report = {"mode": mode, "config": cfg, "machine": common.machine_info(), "sections": {}}
    timing = {}

    def section(name, fn):
        t0 = time.perf_counter()
        load0 = common.load_average()
        common.log(f"== {name} (load average {load0})")
        res = fn()
        res["load_average"] = {"before": load0, "after": common.load_average()}
        res["wall_s"] = time.perf_counter() - t0
        report["sections"][name] = res
        timing[name] = res["wall_s"]
        return res

    from benchmarks import flops as flops_mod

    if "flops" in sections:
        section("flops", lambda: flops_mod.run_flops(cfg["flops_variants"] or list(ALL_VARIANTS), cfg["image_size"]))
    gflops = flops_mod.flops_lookup(report["sections"].get("flops"))
    if "inference" in sections:
        from benchmarks import inference

        section("inference", lambda: inference.run_inference(
            cfg["variants"], cfg["batch_sizes"], cfg["image_size"], cfg["repeats"],
            torch_compile=args.torch_compile, flops_per_image=gflops, peak_tflops=args.peak_tflops,
            lowering=args.lowering, experiments=() if args.no_experiments else tuple(inference.JAX_EXPERIMENTS)))
    if "profile" in sections:
        from benchmarks import profile

        section("profile", lambda: profile.run_profile(cfg["profile_variants"], args.profile_batch, cfg["image_size"],
                                                       max(1, cfg["repeats"] // 2), ops=cfg["repeats"] > 1,
                                                       lowering=args.lowering))
    if "train" in sections:
        from benchmarks import train_step

        section("train", lambda: train_step.run_train_step(
            cfg["train_variants"], [8] if not args.batch_sizes else args.batch_sizes, cfg["image_size"],
            max(1, min(cfg["train_repeats"], cfg["repeats"])), flops_per_image=gflops, peak_tflops=args.peak_tflops,
            lowering=args.lowering))
    if "pipeline" in sections:
        from benchmarks import input_pipeline

        train_rates = {r["variant"]: r["jax_img_s"] for r in report["sections"].get("train", {}).get("summary", [])}
        section("pipeline", lambda: input_pipeline.run_input_pipeline(
            cfg["image_size"], batch=args.pipeline_batch, chunks=args.pipeline_chunks,
            batches_per_chunk=4 if args.pipeline_chunks > 1 else 1,
            thread_counts=[t or None for t in args.pipeline_threads], data_dir=args.data_dir, train_img_s=train_rates))
    if "deploy" in sections:
        from benchmarks import deploy

        section("deploy", lambda: deploy.run_deploy(cfg["variants"], args.deploy_batch_sizes, cfg["image_size"],
                                                    cfg["repeats"]))
    report["section_wall_s"] = timing
    return report


def to_markdown(report: dict) -> str:
    from benchmarks import deploy, flops, inference, input_pipeline, profile, train_step

    m = report["machine"]
    lines = [f"### FastViT benchmarks ({report['mode']}, {m['date']})", "",
             f"Machine: {m['cpu_model']} ({m['cpu_id']}, {m['cpu_flags']}), {m['cpu_cores']} cores, "
             f"{m['mem_total_gib']} GiB; JAX {m['jax']} ({m['jax_backend']}: {', '.join(sorted(set(m['jax_devices'])))})"
             f", flax {m['flax']}, torch {m['torch']} ({m.get('torch_threads')} threads); XLA CPU threads: "
             f"{m['xla_cpu_threads']}; XLA_FLAGS={m['XLA_FLAGS'] or '(none)'}; host memory: {m.get('host_malloc', '?')}; commit {m['git_commit']}.", ""]
    secs = report["sections"]
    render = [("inference", "Inference (img/s, median of round-robin timings; min–max in brackets)", inference),
              ("train", "Training step (fwd + bwd + AdamW, BN in train mode)", train_step),
              ("profile", "Per-block profile (fused forward)", profile),
              ("pipeline", "Input pipeline (train preprocessing)", input_pipeline),
              ("deploy", "Deploy runtimes (fused model, CPU latency)", deploy),
              ("flops", "Params / GMACs", flops)]
    for key, title, mod in render:
        if key in secs:
            la = secs[key].get("load_average", {})
            lines += [f"#### {title}", "", mod.markdown(secs[key]), "",
                      f"_load average before/after: {la.get('before')} / {la.get('after')}; "
                      f"section wall time {secs[key].get('wall_s', 0):.0f} s_", ""]
    return "\n".join(lines)


def main(argv=None):
    common.prepare_process()
    args = parse_args(argv)
    report = run(args)
    md = to_markdown(report)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    out = args.out or os.path.join(common.RESULTS_DIR, f"{report['mode']}-{stamp}.json")
    common.write_json(report, out)
    from benchmarks import plots

    if args.out:  # charts beside the given JSON: <name>-inference.png, ...
        charts = plots.write_charts(report, os.path.dirname(os.path.abspath(out)),
                                    os.path.splitext(os.path.basename(out))[0])
    else:  # beside latest-<mode>.md, which shows them
        prefix = f"latest-{report['mode']}"
        charts = plots.write_charts(report, common.RESULTS_DIR, prefix)
        md += "\n" + "\n".join(f"![{os.path.basename(c)}]({os.path.basename(c)})" for c in charts) + "\n"
        common.write_json(report, os.path.join(common.RESULTS_DIR, f"{prefix}.json"))
        with open(os.path.join(common.RESULTS_DIR, f"{prefix}.md"), "w") as f:
            f.write(md + "\n")
    print(md)
    for c in charts:
        common.log(f"wrote {c}")
    common.log(f"wrote {out}")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
