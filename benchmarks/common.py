"""Shared benchmark helpers: machine info, interleaved timing, same-weights model pairs, output.

Timing rules (all benchmarks): warm-up calls are excluded; the implementations being compared
are timed *round-robin* in one process (A, B, C, A, B, C, ...) so that background load on a
shared machine hits all of them alike; we report the median and the spread (min/max and IQR).
Ratios are computed from medians of the same round-robin run.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from fastvit_jax import host_memory  # noqa: E402  (imports neither JAX nor PyTorch)

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

# Dense peak TFLOP/s (bf16 / fp16 tensor cores without sparsity) for MFU; override with --peak_tflops.
KNOWN_PEAK_TFLOPS = {
    "H100": 989.0,  # SXM; PCIe is 756
    "H200": 989.0,
    "A100": 312.0,
    "L4": 121.0,
    "RTX 4090": 165.2,
    "V100": 125.0,
    "TPU v4": 275.0,
    "TPU v5 lite": 197.0,
    "TPU v5e": 197.0,
    "TPU v5p": 459.0,
    "TPU v6 lite": 918.0,
    "TPU v6e": 918.0,
}


# ------------------------------------------------------------------------------------------
# machine
# ------------------------------------------------------------------------------------------
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags_summary() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    return ""


def cpu_family_model() -> str:
    fam = mod = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("cpu family") and fam is None:
                    fam = line.split(":", 1)[1].strip()
                elif line.startswith("model\t") and mod is None:
                    mod = line.split(":", 1)[1].strip()
    except OSError:
        pass
    return f"family {fam} model {mod}" if fam else ""


def _version(mod: str) -> Optional[str]:
    try:
        m = __import__(mod)
        return getattr(m, "__version__", "?")
    except Exception:  # noqa: BLE001 - optional package
        return None


def git_commit() -> Optional[str]:
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "fastvit_jax", "torch_ref", "benchmarks"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "") if out.returncode == 0 else None
    except Exception:  # noqa: BLE001
        return None


def load_average() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def prepare_process() -> None:
    """First call of every benchmark entry point, before JAX or PyTorch is imported: the glibc
    malloc settings of ``fastvit_jax.host_memory`` (both frameworks run under the same ones;
    ``FASTVIT_HOST_MALLOC=default`` measures glibc's defaults instead)."""
    host_memory.keep_freed_host_memory()


def machine_info() -> Dict[str, Any]:
    """CPU model, cores, memory, accelerator, library versions, thread settings, date."""
    import jax

    info: Dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_family_model(),
        "cpu_flags": cpu_flags_summary(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "mem_total_gib": _mem_total_gib(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "jax_devices": [str(d.device_kind) for d in jax.devices()],
        "flax": _version("flax"),
        "optax": _version("optax"),
        "torch": _version("torch"),
        "numpy": _version("numpy"),
        "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
        "host_malloc": host_memory.describe(),
        "git_commit": git_commit(),
        "load_average_at_start": load_average(),
    }
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["torch_cuda"] = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pass
    # XLA:CPU runs each op on an Eigen/"intra-op" thread pool sized to the visible cores; there is no
    # public knob for its size (--xla_cpu_multi_thread_eigen=false makes dots/convs single-threaded).
    info["xla_cpu_threads"] = "intra-op pool = visible cores (%s)" % info["cpu_affinity"]
    return info


def _mem_total_gib() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    return round(int(line.split()[1]) / 2 ** 20, 1)
    except OSError:
        pass
    return None


def setup_torch_threads(n: Optional[int] = None) -> int:
    """Same thread count for PyTorch as XLA uses (all visible cores unless ``n``)."""
    import torch

    n = n or (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count())
    torch.set_num_threads(n)
    return n


def torch_device():
    """CUDA if PyTorch sees a GPU (with ``cudnn.benchmark`` on: PyTorch's fastest eager convs), else CPU."""
    import torch

    if torch.cuda.is_available():
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    return torch.device("cpu")


def jax_compute_dtype():
    """The benchmarks' JAX compute dtype: float32 on CPU, bfloat16 on accelerators."""
    import jax
    import jax.numpy as jnp

    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def torch_infer(fn, x):
    """``fn(x)`` without autograd; on CUDA under bfloat16 autocast (the accelerators' counterpart of
    JAX's bfloat16) and synchronized, so that host timers measure the device work."""
    import torch

    with torch.inference_mode():
        if x.is_cuda:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = fn(x)
            torch.cuda.synchronize()
            return out
        return fn(x)


def accelerator_peak_tflops(override: Optional[float] = None) -> Tuple[Optional[float], str]:
    """(peak TFLOP/s, where it came from) for MFU; None on CPU unless given."""
    if override:
        return float(override), "--peak_tflops"
    import jax

    if jax.default_backend() == "cpu":
        return None, "cpu: pass --peak_tflops to get MFU"
    kind = jax.devices()[0].device_kind
    for name, peak in KNOWN_PEAK_TFLOPS.items():
        if name.lower() in kind.lower():
            return peak * jax.device_count(), f"table ({name} x {jax.device_count()})"
    return None, f"unknown device kind {kind!r}: pass --peak_tflops"


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def summarize(times_s: Sequence[float], items: int = 1) -> Dict[str, float]:
    """Median / min / max / IQR of per-call times, plus items/s at the median and its spread."""
    ts = sorted(times_s)
    n = len(ts)
    med = statistics.median(ts)
    if n >= 4:
        q = statistics.quantiles(ts, n=4, method="inclusive")
        q1, q3 = q[0], q[2]
    else:
        q1, q3 = ts[0], ts[-1]
    return {
        "n": n,
        "median_ms": med * 1e3,
        "min_ms": ts[0] * 1e3,
        "max_ms": ts[-1] * 1e3,
        "q1_ms": q1 * 1e3,
        "q3_ms": q3 * 1e3,
        "per_s": items / med,
        "per_s_min": items / ts[-1],  # slowest call
        "per_s_max": items / ts[0],  # fastest call
        "iqr_rel": (q3 - q1) / med if med > 0 else 0.0,
    }


def interleaved_timings(fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2,
                        min_time_s: float = 0.0) -> Dict[str, List[float]]:
    """Round-robin timing of blocking callables; returns raw per-call seconds per name.

    Every callable must block until its result is ready (``block_until_ready`` / CPU torch).
    ``min_time_s``: keep going (past ``repeats``) until each callable has run this long in total.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    total = 0.0
    rounds = 0
    while rounds < repeats or total < min_time_s:
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            times[name].append(dt)
        total = min(sum(v) for v in times.values())
        rounds += 1
        if rounds >= 10 * max(repeats, 1):
            break
    return times


# ------------------------------------------------------------------------------------------
# memory
# ------------------------------------------------------------------------------------------
def rss_mib() -> Optional[float]:
    """Current resident set size (MiB)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) of this process (Linux: clear_refs 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mib() -> Optional[float]:
    """VmHWM (MiB): the process RSS high-water mark since start or the last ``reset_peak_rss``."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------
# models with the same weights in both frameworks
# ------------------------------------------------------------------------------------------
def torch_model(variant: str, seed: int = 0, calib_size: int = 64, num_classes: int = 1000):
    """A torch_ref train-form model with non-trivial weights (layer scales, BN stats), eval mode."""
    import torch

    import torch_ref
    from torch_ref.testing import make_nontrivial

    torch.manual_seed(seed)
    m = torch_ref.create_model(variant, num_classes=num_classes)
    make_nontrivial(m, seed=seed, image_size=calib_size, batch=2, passes=1)
    return m.eval()


def flax_variables_from_torch(module) -> Dict[str, Any]:
    """torch_ref state_dict -> Flax variables (jnp arrays) via ``fastvit_jax.weights.keys.torch_to_flax``."""
    import jax
    import jax.numpy as jnp

    from fastvit_jax.weights.keys import torch_to_flax

    return jax.tree.map(jnp.asarray, torch_to_flax(module.state_dict()))


def param_count(tree: Any) -> int:
    import jax
    import numpy as np

    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


# ------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------
def fmt(v: Any, nd: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(fmt(c) if not isinstance(c, str) else c for c in r) + " |")
    return "\n".join(out)


def write_json(obj: Any, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
        f.write("\n")
    return path


def _json_default(o: Any) -> Any:
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:
        pass
    return str(o)


def log(*args: Any) -> None:
    print(*args, file=sys.stderr, flush=True)
