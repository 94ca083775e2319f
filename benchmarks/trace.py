"""Where the time of one compiled JAX call goes: a profiler trace summed per HLO op and per model scope.

Runs ``steps`` calls of the fused/unfused forward or of the training step (the one in
``benchmarks.train_step``) under ``jax.profiler.trace``, reads the Perfetto trace, keeps the
events that are ops of the compiled executable (an event named like an HLO instruction of
``compiled.as_text()``, or carrying ``hlo_op`` in its args: CPU thunks and GPU kernels), and sums
their durations per instruction and per Flax module scope (taken from each instruction's
``op_name`` metadata; ``transpose(jvp(...))`` marks the backward pass).

    python -m benchmarks.trace --what train --variant t8 --batch 8       # CPU
    python -m benchmarks.trace --what forward --fused --batch 128         # on a GPU

Writes the trace directory (open it with Perfetto / TensorBoard) and prints two tables.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable, Dict, List, Optional


from benchmarks import common



def hlo_op_names(hlo_text: str) -> Dict[str, str]:
    """{instruction name: op_name metadata ('' if none)} of every instruction in an HLO module's text."""
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=", line)
        if m:
            op = re.search(r'op_name="([^"]*)"', line)
            out[m.group(1)] = op.group(1) if op else ""
    return out


# Flax module names of fastvit_jax (the torch_ref/timm names), optionally numbered: 'stages_0', 'fc1', ...
_MODULE = re.compile(r"(stem|stages|blocks|proj|conv_kxk|final_conv|head|downsample|pos_emb|token_mixer|mlp|norm|"
                     r"mixer|layer_scale|layer_scale_1|layer_scale_2|conv|fc1|fc2|fc|reparam_conv|large_conv|"
                     r"small_conv|conv_scale|identity|se|attn|qkv|bn|reduce|expand)(_\d+)?")


def scope_of(op_name: str, depth: int = 3) -> str:
    """'jit(step)/transpose(jvp(FastVit))/stages_0/blocks_1/mlp/fc1/...' -> 'bwd stages_0/blocks_1/mlp'."""
    parts = [p for p in op_name.split("/") if p]
    direction = "bwd" if any(p.startswith("transpose(") for p in parts) else "fwd"
    modules = [p for p in parts if _MODULE.fullmatch(p)]
    if not modules:
        return f"{direction} (outside the model: loss, optimizer, layout)" if parts else "(no op_name)"
    return f"{direction} " + "/".join(modules[:depth])


def perfetto_trace_path(trace_dir: str) -> str:
    """The newest perfetto_trace.json.gz that ``jax.profiler.trace(create_perfetto_trace=True)`` wrote."""
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json.gz under {trace_dir}")
    return max(paths, key=os.path.getmtime)


def read_trace_events(trace_dir: str) -> List[Dict[str, Any]]:
    with gzip.open(perfetto_trace_path(trace_dir)) as f:
        trace = json.load(f)
    return trace["traceEvents"] if isinstance(trace, dict) else trace


def op_times(events, op_names: Dict[str, str], calls: int) -> Dict[str, float]:
    """{instruction: microseconds per call} over the events that are ops of the executable."""
    total: Dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = (e.get("args") or {}).get("hlo_op") or e.get("name", "")
        if name in op_names:
            total[name] += float(e["dur"])
    return {k: v / calls for k, v in total.items()}


def summarize(times_us: Dict[str, float], op_names: Dict[str, str], wall_ms: float, top: int = 25) -> Dict[str, Any]:
    by_scope: Dict[str, float] = collections.defaultdict(float)
    for name, us in times_us.items():
        by_scope[scope_of(op_names[name])] += us
    busy = sum(times_us.values())
    ops = sorted(times_us.items(), key=lambda kv: -kv[1])[:top]
    return {"wall_ms_per_call": wall_ms, "op_ms_per_call": busy / 1e3,
            "ops": [{"op": k, "ms": v / 1e3, "share": v / busy if busy else 0.0, "op_name": op_names[k]} for k, v in ops],
            "scopes": [{"scope": k, "ms": v / 1e3, "share": v / busy if busy else 0.0}
                       for k, v in sorted(by_scope.items(), key=lambda kv: -kv[1])[:top]]}


def build(what: str, variant: str, batch: int, image_size: int, fused: bool, lowering: Optional[str]):
    """(call() -> blocking result, compiled executable's HLO text)."""
    import jax

    if what == "train":
        from benchmarks import train_step

        variables = common.flax_variables_from_torch(common.torch_model(variant))
        compiled, state, x, y, _, _ = train_step.build_jax_step(variant, variables, batch, image_size,
                                                                 lowering=lowering)
        return train_step.jax_step_call(compiled, state, x, y), compiled.as_text()
    from benchmarks import inference

    tm = common.torch_model(variant)
    if fused:
        tm = __import__("torch_ref").reparameterize_model(tm)
    variables = common.flax_variables_from_torch(tm)
    compiled, x, _ = inference.build_jax_forward(variant, variables, fused=fused, batch=batch, image_size=image_size,
                                                 lowering=lowering)
    return (lambda: jax.block_until_ready(compiled(variables, x))), compiled.as_text()


def profile_calls(call: Callable[[], Any], hlo_text: str, steps: int, trace_dir: str,
                  top: int = 25) -> Dict[str, Any]:
    """``steps`` blocking calls of a compiled executable (``hlo_text``: its ``as_text()``) under
    ``jax.profiler.trace`` into ``trace_dir``; their time summed per HLO op and per model scope."""
    import time

    import jax

    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t0 = time.perf_counter()
        for _ in range(steps):
            call()
        wall_ms = (time.perf_counter() - t0) * 1e3 / steps
    names = hlo_op_names(hlo_text)
    times = op_times(read_trace_events(trace_dir), names, steps)
    if not times:
        raise RuntimeError(f"no event in the trace under {trace_dir} is an op of the compiled executable")
    return summarize(times, names, wall_ms, top)


def run_trace(what: str = "forward", variant: str = "t8", batch: int = 8, image_size: int = 256, fused: bool = True,
              steps: int = 5, lowering: Optional[str] = None, trace_dir: Optional[str] = None,
              top: int = 25) -> Dict[str, Any]:
    import jax

    call, hlo = build(what, variant, batch, image_size, fused, lowering)
    for _ in range(2):
        call()
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="fastvit-trace-")
    out = profile_calls(call, hlo, steps, trace_dir, top)
    out.update({"what": what, "variant": variant, "batch": batch, "image_size": image_size,
                "form": "fused" if fused and what == "forward" else "unfused", "steps": steps,
                "backend": jax.default_backend(), "trace_dir": trace_dir})
    return out


def markdown(r: Dict[str, Any]) -> str:
    head = (f"**{r['what']}** {r['variant']} ({r['form']}), batch {r['batch']}, {r['image_size']} px, {r['backend']}: "
            f"{r['wall_ms_per_call']:.2f} ms per call, {r['op_ms_per_call']:.2f} ms of ops (summed over threads/streams)")
    scopes = common.markdown_table(["scope", "ms per call", "share"],
                                   [[s["scope"], f"{s['ms']:.2f}", f"{100 * s['share']:.1f}%"] for s in r["scopes"]])
    ops = common.markdown_table(["HLO op", "ms per call", "share", "op_name"],
                                [[o["op"], f"{o['ms']:.2f}", f"{100 * o['share']:.1f}%", o["op_name"][-90:] or "–"]
                                 for o in r["ops"]])
    return f"{head}\n\n{scopes}\n\n{ops}\n\ntrace: {r['trace_dir']}"


def main(argv=None):
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", choices=["forward", "train"], default="forward")
    p.add_argument("--variant", default="t8")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--unfused", action="store_true", help="forward: the train form (default: fused)")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--lowering", choices=["native", "shift"], default=None)
    p.add_argument("--trace_dir", default=None)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    r = run_trace(args.what, args.variant, args.batch, args.image_size, not args.unfused, args.steps, args.lowering,
                  args.trace_dir, args.top)
    if args.json:
        common.write_json(r, args.json)
    print(markdown(r))


if __name__ == "__main__":
    main()
