"""``--compile_only --topology v5e:8x8``: the real train and eval steps compiled for a TPU slice on
a CPU host (deviceless ahead-of-time compilation with libtpu), with per-chip estimates.

The model, optimizer, state shardings and jitted steps are the trainer's own: both build them
with ``fastvit_jax.training.programs`` (the trainer over its devices, this module over the
slice's devices from ``jax.experimental.topologies``). From the compiled programs: memory per
chip (arguments, temporaries, outputs) against the chip's HBM, FLOPs and bytes per step (XLA's
cost analysis), and the roofline step time they imply against the chip's published bfloat16
peak and HBM bandwidth, with the img/s per chip and the MFU that follow. These are estimates
read from the compiled program, not measurements. (XLA's own ``optimal_seconds`` is not used:
it comes out negative for these programs.)

libtpu is not importable by normal runs: an importable libtpu makes every CPU/GPU start load
it (~0.7 GB) and probe for a TPU, and turns off the CPU host-memory tuning
(``fastvit_jax/host_memory.py``). ``make setup`` installs it beside the environment
(``.venv/libtpu-aot``) and this module points JAX at it (``TPU_LIBRARY_PATH``) before JAX
starts, for this process only. An importable one (``pip install -e .[tpu]``, a TPU VM's) is used
too.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

LIBTPU_PIN = "libtpu==0.0.42.1"  # the build that matches jax 0.10.2 (pyproject.toml's tpu extra)
LIBTPU_DIRNAME = "libtpu-aot"


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures: peak dense bfloat16 FLOP/s, HBM bandwidth and capacity."""

    name: str
    bf16_tflops: float  # peak dense bfloat16, TFLOP/s
    hbm_gbps: float  # HBM bandwidth, GB/s
    hbm_gib: float  # HBM capacity, GiB
    source: str  # where the figures are published
    megacore: bool = False  # two TensorCores that JAX drives as one device (v4, v5p)
    clock_ghz: Optional[float] = None  # TensorCore clock, where the published figures fix it


# Google Cloud TPU documentation, "System architecture" tables (read 2026-12):
CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", 275.0, 1200.0, 32.0, "https://cloud.google.com/tpu/docs/v4 (275 TFLOPs, 32 GiB, 1200 GBps)",
               megacore=True),
    # v5e: one TensorCore with four 128x128 MXUs (2 FLOPs per multiply-add) at 197 TFLOP/s:
    # 197e12 / (4 * 128 * 128 * 2) = 1.5 GHz. The other chips' tables do not fix their clocks.
    "v5e": Chip("v5e", 197.0, 819.0, 16.0, "https://cloud.google.com/tpu/docs/v5e (197 TFLOPs, 16 GB, 819 GBps, "
                "one TensorCore with four MXUs)", clock_ghz=1.5),
    "v5p": Chip("v5p", 459.0, 2765.0, 95.0, "https://cloud.google.com/tpu/docs/v5p (459 TFLOPs, 95 GB, 2765 GBps)",
                megacore=True),
    "v6e": Chip("v6e", 918.0, 1638.0, 32.0, "https://cloud.google.com/tpu/docs/v6e (918 TFLOPs, 32 GB, 1638 GBps)"),
}

# The datasets --compile_only knows without reading them: (classes, train examples).
KNOWN_DATASETS = {"imagenet2012": (1000, 1_281_167), "demo": (10, 0), "fastvit_demo": (10, 0)}
STEPS = ("train_step", "eval_step")


class CompileOnlyError(ValueError):
    """A --compile_only request that cannot be served; the message says what to change."""


def libtpu_path() -> Optional[str]:
    """The libtpu.so to use: $TPU_LIBRARY_PATH when set (None if it is not a file), else the
    environment's libtpu-aot folder, else an importable libtpu (found without importing it)."""
    if "TPU_LIBRARY_PATH" in os.environ:
        path = os.environ["TPU_LIBRARY_PATH"]
        return path if os.path.isfile(path) else None
    candidates = [os.path.join(sys.prefix, LIBTPU_DIRNAME, "libtpu", "libtpu.so")]
    spec = importlib.util.find_spec("libtpu")
    if spec is not None and spec.submodule_search_locations:
        candidates += [os.path.join(d, "libtpu.so") for d in spec.submodule_search_locations]
    return next((path for path in candidates if os.path.isfile(path)), None)


def missing_libtpu_message() -> str:
    """One line: what is missing and the commands that install it."""
    if os.environ.get("TPU_LIBRARY_PATH"):
        return (f"--compile_only: TPU_LIBRARY_PATH={os.environ['TPU_LIBRARY_PATH']} is not a file; unset it or point "
                f"it at a libtpu.so ({LIBTPU_PIN})")
    return (f"--compile_only needs libtpu, which is not installed: run `make setup` (it puts {LIBTPU_PIN} beside "
            f".venv, where CPU/GPU runs never load it), or `pip install -e .[tpu]` (importable: CPU runs then probe "
            f"for a TPU at start)")


def prepare_deviceless_tpu() -> str:
    """Points JAX at libtpu for deviceless compilation; must run before JAX starts. Returns the .so path.

    ``ALLOW_MULTIPLE_LIBTPU_LOAD``: libtpu otherwise holds /tmp/libtpu_lockfile for the life of
    the process, so a second compile (another shell, a parallel test) fails to start."""
    path = libtpu_path()
    if path is None:
        raise CompileOnlyError(missing_libtpu_message())
    os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_LIBRARY_PATH=path,
                      TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return path


def parse_topology(name: str) -> Tuple[Chip, Tuple[int, int, int]]:
    """'v5e:8x8' -> (Chip, (8, 8, 1)); CompileOnlyError naming the accepted forms."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?", name.strip())
    if not match:
        raise CompileOnlyError(f"--topology {name!r} is not CHIP:AxB[xC] with CHIP one of {', '.join(CHIPS)} "
                               f"(e.g. v5e:1x1, v5e:2x2, v5e:8x8, v6e:4x4, v4:2x2x1, v5p:2x2x4)")
    chip = CHIPS[match.group(1)]
    dims = tuple(int(d) for d in match.groups()[1:] if d is not None)
    return chip, dims + (1,) * (3 - len(dims))


def topology_devices(name: str) -> list:
    """The devices of TPU slice ``name`` (no TPU needed): one per chip, as JAX sees a real slice
    (v4/v5p: megacore, the chip's two TensorCores as one device)."""
    from jax.experimental import topologies

    chip, dims = parse_topology(name)
    per_host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
    try:
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=name.strip(), chip_config_name="megacore" if chip.megacore else "default",
            chips_per_host_bounds=per_host, num_slices=1).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors for an unknown topology vary
        raise CompileOnlyError(f"libtpu ({LIBTPU_PIN}) cannot build the topology {name!r}: "
                               f"{str(e).splitlines()[0][:200]} (accepted e.g. v5e:1x1, v5e:2x2, v5e:8x8, v6e:2x2, "
                               f"v4:2x2x1, v5p:2x2x1)") from None


def roofline(flops: float, nbytes: float, chip: Chip, images: int) -> Dict[str, float]:
    """Step time bound by compute or HBM traffic, and what follows per chip."""
    compute_s = flops / (chip.bf16_tflops * 1e12)
    memory_s = nbytes / (chip.hbm_gbps * 1e9)
    step_s = max(compute_s, memory_s)
    return {"compute_bound_s": compute_s, "memory_bound_s": memory_s, "step_s": step_s,
            "bound": "memory" if memory_s >= compute_s else "compute",
            "img_per_s_per_chip": images / step_s if step_s else math.inf,
            "mfu": compute_s / step_s if step_s else 0.0}


def memory_per_chip(compiled: Any) -> Dict[str, int]:
    """XLA's memory analysis of a compiled step, bytes per chip: arguments, temporaries, outputs,
    aliased (outputs living in donated arguments), code, and the total live at once."""
    memory = compiled.memory_analysis()
    sizes = {k: int(getattr(memory, f"{k}_size_in_bytes", 0) or 0)
             for k in ("argument", "temp", "output", "alias", "generated_code")}
    sizes["total"] = sizes["argument"] + sizes["temp"] + sizes["output"] - sizes["alias"] + sizes["generated_code"]
    return sizes


def cost_per_chip(compiled: Any) -> Tuple[float, float]:
    """(FLOPs, bytes accessed) per chip per step from XLA's cost analysis."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def cycle_time(cycles: Optional[int], flops: float, chip: Chip, images: int) -> Dict[str, float]:
    """The TPU compiler's estimated cycles (``hlo_cycles``, summed as if the instructions ran one
    after another) as a step time at the chip's clock, and the img/s per chip and MFU that follow;
    empty where the cycles or the clock are unknown. Unlike the roofline, it prices the vector
    unit's work (depthwise convolutions, BatchNorm, GELU) at the vector unit's speed, not at the
    MXUs' peak."""
    if not cycles or chip.clock_ghz is None:
        return {}
    step_s = cycles / (chip.clock_ghz * 1e9)
    return {"cycles_step_s": step_s, "cycles_img_per_s_per_chip": images / step_s,
            "cycles_mfu": flops / (chip.bf16_tflops * 1e12) / step_s}


def analyse(compiled: Any, chip: Chip, images_per_chip: int) -> Dict[str, Any]:
    """Memory against the chip's HBM, FLOPs, bytes and the roofline of one compiled step, and the
    TPU compiler's own estimate of its cycles (``hlo_cycles``), as a time where the chip's clock is
    known (``cycle_time``)."""
    from fastvit_jax.training.hlo_cycles import total_cycles

    memory = memory_per_chip(compiled)
    flops, nbytes = cost_per_chip(compiled)
    hbm = int(chip.hbm_gib * 2**30)
    cycles = total_cycles(compiled.as_text())
    return {"memory_bytes": memory, "hbm_bytes": hbm, "fits": memory["total"] <= hbm, "flops": flops,
            "bytes_accessed": nbytes, **roofline(flops, nbytes, chip, images_per_chip),
            "estimated_cycles": cycles, **cycle_time(cycles, flops, chip, images_per_chip)}


def compile_config(config: Any) -> Any:
    """``config`` with num_classes filled in from the dataset's known size (the dataset is not read)."""
    known = KNOWN_DATASETS.get(config.dataset)
    if config.num_classes:
        return config
    if known is None:
        raise CompileOnlyError(f"--compile_only does not read the dataset: pass --num_classes for {config.dataset!r} "
                               f"(known: {', '.join(KNOWN_DATASETS)})")
    return config.replace(num_classes=known[0])


def compile_only(config: Any, topology: str, model_fn: Callable, *, lowering: Optional[str] = None,
                 steps: Sequence[str] = STEPS,
                 on_compiled: Optional[Callable[[str, Any], None]] = None) -> Dict[str, Any]:
    """Compiles the run's ``steps`` (train and eval) for ``topology`` with the trainer's programs;
    returns the per-chip report. ``lowering``: the convolutions' ('native', the TPU default, or 'shift').
    ``on_compiled(step_name, compiled)`` is called with each compiled program (to read its text)."""
    from fastvit_jax.training import mesh as mesh_lib
    from fastvit_jax.training.evaluate import eval_batch_size
    from fastvit_jax.training.plan import make_plan
    from fastvit_jax.training.programs import build_model, build_step_programs, eval_batch_spec, train_batch_spec
    from fastvit_jax.training.setup import resolve_dtype, resolve_remat
    from fastvit_jax.training.steps import config_optimizer, run_args, schedule_of

    chip, _ = parse_topology(topology)
    devices = topology_devices(topology)
    config = compile_config(config)
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    divisor = mesh_lib.batch_size_divisor(mesh)
    if config.global_batch_size % divisor:
        raise CompileOnlyError(f"--global_batch_size {config.global_batch_size} does not split over the "
                               f"{divisor} chips of the batch axes of {dict(mesh.shape)}")
    lowering = lowering or "native"  # conv.default_lowering() on a TPU
    model = build_model(config, model_fn, platform="tpu", lowering=lowering)
    plan = make_plan(config, max(config.global_batch_size, KNOWN_DATASETS.get(config.dataset, (0, 0))[1]))
    optimizer_for, args = config_optimizer(config), run_args(plan, config)
    size = config.image_size
    programs = build_step_programs(config, model, optimizer_for, optimizer_for(schedule_of(args)), mesh,
                                   train_batch_spec(config.global_batch_size, size))
    per_chip = config.global_batch_size // divisor
    eval_batch = eval_batch_size(config, mesh)
    report = {
        "note": "ESTIMATES read from the compiled programs (XLA's memory and cost analysis against the chip's "
                "published peak bfloat16 FLOP/s and HBM bandwidth), not measurements",
        "variant": config.variant, "topology": topology, "chips": len(devices), "chip": dataclasses.asdict(chip),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch_size": config.global_batch_size,
        "images_per_chip": per_chip, "eval_batch_size": eval_batch, "image_size": size,
        "num_classes": config.num_classes, "dtype": jnp_name(resolve_dtype(config.dtype, "tpu")),
        "remat": resolve_remat(config.remat, "tpu"), "lowering": lowering,
    }
    if "train_step" in steps:
        start = time.perf_counter()
        compiled = programs.train_step.lower(*programs.train_inputs(args)).compile()
        report["train_step"] = {**analyse(compiled, chip, per_chip), "compile_s": round(time.perf_counter() - start, 1)}
        if on_compiled is not None:
            on_compiled("train_step", compiled)
    if "eval_step" in steps:
        start = time.perf_counter()
        compiled = programs.eval_step.lower(*programs.eval_inputs(eval_batch_spec(eval_batch, size))).compile()
        # one eval step evaluates the weights and their EMA: two forward passes per image
        report["eval_step"] = {**analyse(compiled, chip, eval_batch // divisor),
                               "compile_s": round(time.perf_counter() - start, 1)}
        if on_compiled is not None:
            on_compiled("eval_step", compiled)
    return report


def jnp_name(dtype: Any) -> str:
    import numpy as np

    return np.dtype(dtype).name


def describe(report: Dict[str, Any]) -> str:
    """The report as lines a person reads (per chip)."""
    gib = 2.0 ** 30
    lines = [f"fastvit_{report['variant']} on {report['topology']} ({report['chips']} chips, mesh {report['mesh']}), "
             f"global batch {report['global_batch_size']} ({report['images_per_chip']} per chip), "
             f"{report['image_size']} px, {report['dtype']}, remat {report['remat']}, "
             f"{report['lowering']} convs; chip {report['chip']['name']}: {report['chip']['bf16_tflops']:g} TFLOP/s "
             f"bf16, {report['chip']['hbm_gbps']:g} GB/s, {report['chip']['hbm_gib']:g} GiB HBM",
             "ESTIMATES from the compiled programs, not measurements (XLA's cost and memory analysis):"]
    for name in [s for s in STEPS if s in report]:
        r = report[name]
        m = r["memory_bytes"]
        lines.append(
            f"  {name.replace('_', ' ')}: memory per chip {m['total'] / gib:.2f} GiB of {r['hbm_bytes'] / gib:.0f} GiB "
            f"({'fits' if r['fits'] else 'DOES NOT FIT'}; arguments {m['argument'] / gib:.2f}, temporaries "
            f"{m['temp'] / gib:.2f}, outputs {m['output'] / gib:.2f}); {r['flops']:.3g} FLOPs and "
            f"{r['bytes_accessed']:.3g} bytes per chip per step -> {r['step_s'] * 1e3:.1f} ms ({r['bound']}-bound), "
            f"{r['img_per_s_per_chip']:.0f} img/s per chip, MFU {100 * r['mfu']:.1f}%"
            + (f"; the TPU compiler's own estimate {r['estimated_cycles'] / 1e6:.1f} M cycles"
               if r.get("estimated_cycles") else "")
            + (f" = {r['cycles_step_s'] * 1e3:.1f} ms at {report['chip']['clock_ghz']:g} GHz, "
               f"{r['cycles_img_per_s_per_chip']:.0f} img/s per chip, MFU {100 * r['cycles_mfu']:.1f}%"
               if "cycles_step_s" in r else "") + f" (compiled in {r['compile_s']}s)")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], path: str) -> str:
    from fastvit_jax.io import write_atomically

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)

    return write_atomically(path, write)
