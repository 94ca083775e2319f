"""CPU latency of the fused model in deploy runtimes: JAX jit, ONNX Runtime, LiteRT (TFLite), PyTorch eager.

The same non-trivial weights (``benchmarks.common.torch_model``, fused) go to every runtime:
ONNX and TFLite files are written by ``fastvit_jax.export`` into a temporary folder. One
(variant, batch) is timed round-robin in this process (``benchmarks.common.interleaved_timings``);
PyTorch runs NCHW and channels_last and the faster counts. Latency = median ms per call.

    python -m benchmarks.deploy --variants t8 sa12 --batch_sizes 1 8 --image_size 256
"""

from __future__ import annotations

import argparse
import os
import tempfile
from typing import Any, Dict, List, Sequence

import numpy as np

from benchmarks import common

RUNTIMES = ("jax", "onnxruntime", "litert", "torch")


def _runtime_calls(variant: str, batch: int, image_size: int, workdir: str) -> Dict[str, Any]:
    """{runtime: blocking zero-arg callable} on one shared input, plus the max logit deviation from JAX."""
    import jax
    import onnxruntime
    import torch
    from ai_edge_litert.interpreter import Interpreter

    import fastvit_jax
    import torch_ref
    from fastvit_jax import export
    from fastvit_jax.compare import relative_error

    fused_torch = torch_ref.reparameterize_model(common.torch_model(variant)).eval()
    variables = common.flax_variables_from_torch(fused_torch)
    model = fastvit_jax.create_model(variant, inference_mode=True)
    x = np.random.RandomState(1).randn(batch, image_size, image_size, 3).astype(np.float32)

    onnx_path, tflite_path = os.path.join(workdir, f"{variant}.onnx"), os.path.join(workdir, f"{variant}.tflite")
    if not os.path.exists(onnx_path):
        export.write_onnx(onnx_path, model, variables, image_size, batch=None)
        export.write_tflite(tflite_path, model, variables, image_size, batch=None)
    session = onnxruntime.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    interpreter = Interpreter(model_path=tflite_path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()

    forward = jax.jit(lambda v, images: model.apply(v, images))
    x_jax = jax.device_put(x)
    x_nchw = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    x_torch = torch.from_numpy(x_nchw)
    x_cl = x_torch.contiguous(memory_format=torch.channels_last)
    torch_cl = torch_ref.reparameterize_model(common.torch_model(variant)).eval().to(memory_format=torch.channels_last)

    def litert():
        interpreter.set_tensor(inp["index"], x)
        interpreter.invoke()
        return interpreter.get_tensor(out["index"])

    calls = {
        "jax": lambda: forward(variables, x_jax).block_until_ready(),
        "onnxruntime": lambda: session.run(None, {"image": x_nchw})[0],
        "litert": litert,
        "torch_nchw": lambda: common.torch_infer(fused_torch, x_torch),
        "torch_cl": lambda: common.torch_infer(torch_cl, x_cl),
    }
    reference = np.asarray(calls["jax"]())
    deviation = {name: relative_error(np.asarray(fn()), reference) for name, fn in calls.items()}
    return {"calls": calls, "deviation": deviation}


def run_deploy(variants: Sequence[str] = ("t8", "sa12"), batch_sizes: Sequence[int] = (1, 8), image_size: int = 256,
               repeats: int = 10) -> Dict[str, Any]:
    common.setup_torch_threads()
    rows: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as workdir:
        for variant in variants:
            for batch in batch_sizes:
                common.log(f"deploy: {variant} batch {batch}")
                built = _runtime_calls(variant, batch, image_size, workdir)
                times = common.interleaved_timings(built["calls"], repeats)
                stats = {name: common.summarize(t, items=batch) for name, t in times.items()}
                torch_best = min(("torch_nchw", "torch_cl"), key=lambda n: stats[n]["median_ms"])
                row = {"variant": variant, "batch": batch, "image_size": image_size, "torch_layout": torch_best,
                       "deviation_from_jax": built["deviation"]}
                for runtime in RUNTIMES:
                    s = stats[torch_best if runtime == "torch" else runtime]
                    row[f"{runtime}_ms"] = s["median_ms"]
                    row[f"{runtime}_img_s"] = s["per_s"]
                rows.append(row)
    return {"rows": rows}


def markdown(result: Dict[str, Any]) -> str:
    head = ["variant", "batch"] + [f"{r} ms" for r in RUNTIMES] + ["fastest", "vs JAX"]
    body = []
    for r in result["rows"]:
        fastest = min(RUNTIMES, key=lambda name: r[f"{name}_ms"])
        body.append([r["variant"], r["batch"]] + [f"{r[f'{name}_ms']:.1f}" for name in RUNTIMES]
                    + [fastest, f"{r['jax_ms'] / r[f'{fastest}_ms']:.2f}×"])
    worst = max(max(v for k, v in r["deviation_from_jax"].items()) for r in result["rows"])
    return (common.markdown_table(head, body) + f"\n\nMedian latency per call (fused model, float32, "
            f"{result['rows'][0]['image_size']} px); torch = the faster of NCHW and channels_last eager. All runtimes "
            f"agree with JAX to {worst:.1e} (max |Δlogit| / max |logit|).")


def main(argv=None) -> None:
    common.prepare_process()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12"])
    p.add_argument("--batch_sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args(argv)
    print(markdown(run_deploy(args.variants, args.batch_sizes, args.image_size, args.repeats)))


if __name__ == "__main__":
    main()
