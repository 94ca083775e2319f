"""``--compile_only --topology v5e:8x8``: the real train and eval steps compiled for a TPU slice on
a CPU host (deviceless ahead-of-time compilation with libtpu), with per-chip estimates.

The steps, shardings, model and optimizer are the trainer's own (``trainer.jit_train_step``,
``steps.make_train_step``, ``mesh.state_shardings``), built over the slice's devices from
``jax.experimental.topologies``. From the compiled programs: memory per chip (arguments,
temporaries, outputs) against the chip's HBM, FLOPs and bytes per step (XLA's cost analysis),
and the roofline step time they imply against the chip's published bfloat16 peak and HBM
bandwidth, with the img/s per chip and the MFU that follow. These are estimates read from the
compiled program, not measurements.

libtpu is not imported by normal runs (it would make every CPU/GPU start probe for a TPU):
``make setup`` installs it beside the environment (``.venv/libtpu-aot``) and this module points
JAX at it (``TPU_LIBRARY_PATH``) before JAX starts, for this process only.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from typing import Any, Callable, Dict, Optional

LIBTPU_PIN = "libtpu==0.0.42.1"  # the build that matches jax 0.10.2
LIBTPU_DIRNAME = "libtpu-aot"


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published per-chip figures (Google Cloud TPU documentation, "System architecture" pages:
    cloud.google.com/tpu/docs/v4, v5e, v5p, v6e)."""

    name: str
    bf16_tflops: float  # peak dense bfloat16
    hbm_gbps: float  # HBM bandwidth, GB/s
    hbm_gib: float  # HBM capacity
    megacore: bool = False  # two TensorCores that JAX drives as one device (v4, v5p)


CHIPS: Dict[str, Chip] = {
    "v4": Chip("v4", 275.0, 1200.0, 32.0, megacore=True),
    "v5e": Chip("v5e", 197.0, 819.0, 16.0),
    "v5p": Chip("v5p", 459.0, 2765.0, 95.0, megacore=True),
    "v6e": Chip("v6e", 918.0, 1638.0, 32.0),
}

# Classes of the datasets --compile_only knows without reading them.
KNOWN_NUM_CLASSES = {"imagenet2012": 1000, "demo": 10, "fastvit_demo": 10}


class CompileOnlyError(ValueError):
    """A --compile_only request that cannot be served; the message says what to change."""


def libtpu_path() -> Optional[str]:
    """The libtpu.so to use: $TPU_LIBRARY_PATH, the environment's libtpu-aot folder, or an importable libtpu."""
    candidates = [os.environ.get("TPU_LIBRARY_PATH"),
                  os.path.join(sys.prefix, LIBTPU_DIRNAME, "libtpu", "libtpu.so")]
    for path in candidates:
        if path and os.path.isfile(path):
            return path
    return None


def prepare_deviceless_tpu() -> str:
    """Points JAX at libtpu for deviceless compilation; must run before JAX starts. Returns the .so path."""
    path = libtpu_path()
    if path is None:
        raise CompileOnlyError(
            f"--compile_only needs libtpu, which is not installed: run `make setup` (it installs {LIBTPU_PIN} into "
            f".venv/{LIBTPU_DIRNAME}) or `pip install --no-deps --target {sys.prefix}/{LIBTPU_DIRNAME} {LIBTPU_PIN}`")
    # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise holds /tmp/libtpu_lockfile for the life of the
    # process, and a second compile at the same time (another shell, a parallel test) fails to start.
    os.environ.update(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", TPU_LIBRARY_PATH=path,
                      TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    return path


def parse_topology(name: str) -> tuple:
    """'v5e:8x8' -> (Chip, (8, 8, 1)); CompileOnlyError naming the accepted forms."""
    match = re.fullmatch(r"(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?", name.strip())
    if not match:
        raise CompileOnlyError(f"--topology {name!r} is not CHIP:AxB[xC] with CHIP one of {', '.join(CHIPS)} "
                               f"(e.g. v5e:2x2, v5e:8x8, v4:2x2x2, v5p:2x2x4)")
    chip = CHIPS[match.group(1)]
    dims = tuple(int(d) for d in match.groups()[1:] if d is not None)
    return chip, dims + (1,) * (3 - len(dims))


def topology_devices(name: str) -> list:
    """The devices of TPU slice ``name`` (no TPU needed): one per chip, as JAX sees a real slice
    (v4 / v5p: megacore, the chip's two TensorCores as one device)."""
    from jax.experimental import topologies

    chip, dims = parse_topology(name)
    per_host = tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))
    try:
        return list(topologies.get_topology_desc(
            platform="tpu", topology_name=name.strip(), chip_config_name="megacore" if chip.megacore else "default",
            chips_per_host_bounds=per_host, num_slices=1).devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors for an unknown topology vary
        raise CompileOnlyError(f"libtpu does not know the topology {name!r}: {str(e).splitlines()[0][:200]}") from None


def roofline(flops: float, nbytes: float, chip: Chip, images: int) -> Dict[str, float]:
    """Step time bound by compute or HBM traffic, and what follows per chip."""
    compute_s = flops / (chip.bf16_tflops * 1e12)
    memory_s = nbytes / (chip.hbm_gbps * 1e9)
    step_s = max(compute_s, memory_s)
    return {"compute_bound_s": compute_s, "memory_bound_s": memory_s, "step_s": step_s,
            "bound": "memory" if memory_s >= compute_s else "compute",
            "img_per_s_per_chip": images / step_s if step_s else math.inf,
            "mfu": compute_s / step_s if step_s else 0.0}


def _analysis(compiled: Any, chip: Chip, images_per_chip: int) -> Dict[str, Any]:
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    sizes = {k: int(getattr(memory, f"{k}_size_in_bytes", 0)) for k in ("argument", "temp", "output", "alias")}
    total = sizes["argument"] + sizes["temp"] + sizes["output"] - sizes["alias"]
    flops, nbytes = float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))
    return {"memory_bytes": {**sizes, "total": total}, "hbm_bytes": int(chip.hbm_gib * 2**30),
            "fits": total <= chip.hbm_gib * 2**30, "flops": flops, "bytes_accessed": nbytes,
            **roofline(flops, nbytes, chip, images_per_chip)}


def compile_only(config: Any, topology: str, model_fn: Callable) -> Dict[str, Any]:
    """Compiles the run's train and eval steps for ``topology``; returns the per-chip report."""
    import jax
    import jax.numpy as jnp

    from fastvit_jax.training import mesh as mesh_lib
    from fastvit_jax.training.plan import make_plan
    from fastvit_jax.training.state import create_state, init_variables
    from fastvit_jax.training.steps import config_optimizer, make_eval_step, make_train_step, run_args, schedule_of
    from fastvit_jax.training.trainer import jit_train_step

    chip, _ = parse_topology(topology)
    devices = topology_devices(topology)
    num_classes = config.num_classes or KNOWN_NUM_CLASSES.get(config.dataset)
    if not num_classes:
        raise CompileOnlyError(f"--compile_only does not read the dataset: pass --num_classes for {config.dataset!r}")
    config = config.replace(num_classes=int(num_classes))
    mesh = mesh_lib.create_mesh(config.mesh, devices)
    if config.global_batch_size % mesh_lib.batch_size_divisor(mesh):
        raise CompileOnlyError(f"--global_batch_size {config.global_batch_size} does not split over the "
                               f"{mesh_lib.batch_size_divisor(mesh)} chips of the batch axes of {dict(mesh.shape)}")
    remat = "elementwise" if config.remat == "auto" else config.remat  # the TPU default
    model = model_fn(config.variant, num_classes=config.num_classes, drop_path_rate=config.drop_path,
                     dtype=jnp.bfloat16 if config.dtype == "auto" else jnp.dtype(config.dtype), remat=remat,
                     lowering="native")
    plan = make_plan(config, max(config.global_batch_size, 1_281_167 if config.dataset == "imagenet2012" else 0))
    optimizer_for, args = config_optimizer(config), run_args(plan, config)
    abstract_state = jax.eval_shape(lambda: create_state(init_variables(model, config.image_size),
                                                         optimizer_for(schedule_of(args))))
    shardings = mesh_lib.state_shardings(mesh, abstract_state, fsdp_min_size=config.fsdp_min_size)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), abstract_state, shardings)
    size = config.image_size
    batch_spec = {"image": ((config.global_batch_size, size, size, 3), jnp.float32),
                  "label": ((config.global_batch_size,), jnp.int32)}
    jitted, batch = jit_train_step(make_train_step(model, optimizer_for, config), shardings, batch_spec, mesh)
    replicated = mesh_lib.replicated(mesh)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=replicated)
    abstract_args = {k: jax.ShapeDtypeStruct((), jnp.float32, sharding=replicated) for k in args}
    per_chip = config.global_batch_size // mesh_lib.batch_size_divisor(mesh)
    start = time.perf_counter()
    train = jitted.lower(state, batch, key, abstract_args).compile()
    train_s = time.perf_counter() - start
    eval_batch = {"image": jax.ShapeDtypeStruct((config.global_batch_size, size, size, 3), jnp.float32,
                                                sharding=mesh_lib.batch_sharding(mesh)),
                  "label": jax.ShapeDtypeStruct((config.global_batch_size,), jnp.int32,
                                                sharding=mesh_lib.batch_sharding(mesh)),
                  "mask": jax.ShapeDtypeStruct((config.global_batch_size,), jnp.float32,
                                               sharding=mesh_lib.batch_sharding(mesh))}
    variables = {"": {"params": state.params, "batch_stats": state.batch_stats}}
    start = time.perf_counter()
    evaluate = jax.jit(make_eval_step(model), out_shardings=replicated).lower(variables, eval_batch).compile()
    eval_s = time.perf_counter() - start
    return {
        "note": "estimates read from the compiled programs (XLA's memory and cost analysis against the chip's "
                "published peak bfloat16 FLOP/s and HBM bandwidth), not measurements",
        "variant": config.variant, "topology": topology, "chips": len(devices), "chip": dataclasses.asdict(chip),
        "mesh": {k: int(v) for k, v in mesh.shape.items()}, "global_batch_size": config.global_batch_size,
        "images_per_chip": per_chip, "image_size": size, "remat": remat, "dtype": "bfloat16",
        "train_step": {**_analysis(train, chip, per_chip), "compile_s": round(train_s, 1)},
        "eval_step": {**_analysis(evaluate, chip, per_chip), "compile_s": round(eval_s, 1)},
    }


def describe(report: Dict[str, Any]) -> str:
    """The report as lines a person reads (per chip)."""
    gib = 2.0 ** 30
    lines = [f"fastvit_{report['variant']} on {report['topology']} ({report['chips']} chips, mesh {report['mesh']}), "
             f"global batch {report['global_batch_size']} ({report['images_per_chip']} per chip), "
             f"{report['image_size']} px, {report['dtype']}, remat {report['remat']}",
             f"ESTIMATES from the compiled programs, not measurements:"]
    for name in ("train_step", "eval_step"):
        r = report[name]
        m = r["memory_bytes"]
        lines.append(
            f"  {name.replace('_', ' ')}: memory per chip {m['total'] / gib:.2f} GiB of {r['hbm_bytes'] / gib:.0f} GiB "
            f"({'fits' if r['fits'] else 'DOES NOT FIT'}; arguments {m['argument'] / gib:.2f}, temporaries "
            f"{m['temp'] / gib:.2f}, outputs {m['output'] / gib:.2f}); {r['flops']:.3g} FLOPs and "
            f"{r['bytes_accessed']:.3g} bytes per chip per step -> {r['step_s'] * 1e3:.1f} ms ({r['bound']}-bound), "
            f"{r['img_per_s_per_chip']:.0f} img/s per chip, MFU {100 * r['mfu']:.1f}% (compiled in {r['compile_s']}s)")
    return "\n".join(lines)


def write_report(report: Dict[str, Any], path: str) -> str:
    from fastvit_jax.io import write_atomically

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(report, f, indent=1)

    return write_atomically(path, write)
