"""Export a FastViT checkpoint as a fused ONNX or TFLite model, verified in its own runtime.

    python -m fastvit_jax.export CHECKPOINT OUTPUT [--format onnx|tflite] [--image_size 256]
                                 [--batch N] [--float16] [--overwrite]

CHECKPOINT: any file ``fastvit_jax.load_model`` reads; a train-form file is fused first.
The format follows OUTPUT's extension (.onnx, .tflite) unless ``--format`` says otherwise.

- ONNX (opset 18): input ``image``, **NCHW** float32 normalised as the checkpoint's data config
  (ImageNet mean/std for the FastViT weights), output ``logits``; the batch axis is dynamic
  unless ``--batch N``. Built through ``torch_ref`` (the same weights in the PyTorch twin) and
  ``torch.onnx.export``: needs PyTorch. Variant, input size, mean/std, crop and class count are
  stored in the model's ``metadata_props``.
- TFLite: input **NHWC** float32 (TFLite's layout), same normalisation; dynamic batch unless
  ``--batch N`` (resize the input tensor before ``allocate_tensors``); ``--float16`` stores the
  weights in float16. Built from TensorFlow ops (``fastvit_jax.tf_forward``); no PyTorch.

Every export is run once in ONNX Runtime / the LiteRT interpreter on a random batch and compared
with JAX; the relative error is printed and an export above 1e-4 is refused. Exit status 2 with one
``error:`` line for a bad checkpoint, format, image size or an existing OUTPUT without --overwrite;
nothing is half-written.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import sys
import warnings
from typing import Any, Dict, Optional, Sequence

import numpy as np

from fastvit_jax.compare import relative_error
from fastvit_jax.quiet import quiet_native_logs


FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
ONNX_OPSET = 18
TOLERANCE = 1e-4


class ExportError(ValueError):
    """An export that cannot be made or failed its check; the message says why."""


@dataclasses.dataclass
class ExportResult:
    path: str
    format: str
    variant: str
    image_size: int
    batch: Optional[int]  # None: dynamic
    relative_error: float  # runtime vs JAX on a random batch, max|Δ| / max|logit|
    num_convs: int


def format_of(path: str, requested: Optional[str]) -> str:
    """'onnx' or 'tflite' from ``requested`` or the file extension."""
    if requested is not None:
        if requested not in FORMATS.values():
            raise ExportError(f"unknown format {requested!r}; valid: {', '.join(FORMATS.values())}")
        return requested
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ExportError(f"cannot tell the format of {path!r} from its extension; use .onnx or .tflite, "
                          "or pass --format")
    return FORMATS[ext]


def export_metadata(model: Any, image_size: int, layout: str) -> Dict[str, str]:
    cfg = model.pretrained_cfg
    return {"producer": "fastvit_jax", "variant": model.cfg.name, "input_layout": layout,
            "input_size": json.dumps([3, image_size, image_size]), "mean": json.dumps(list(cfg.mean)),
            "std": json.dumps(list(cfg.std)), "crop_pct": str(cfg.crop_pct), "interpolation": cfg.interpolation,
            "num_classes": str(model.num_classes)}


# --------------------------------------------------------------------------- ONNX
def _torch_twin(model: Any, variables: Any):
    """The fused torch_ref model holding ``variables`` (eval mode)."""
    import torch

    import torch_ref
    from fastvit_jax.weights.state_dict import variables_to_arrays

    arrays, variant, _ = variables_to_arrays(jax_to_numpy(variables))
    twin = torch_ref.create_model(variant, num_classes=model.num_classes, inference_mode=True)
    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}, strict=True)
    return twin.eval()


def write_onnx(tmp: str, model: Any, variables: Any, image_size: int, batch: Optional[int]) -> None:
    import onnx
    import torch

    twin = _torch_twin(model, variables)
    example = torch.zeros(batch or 2, 3, image_size, image_size)
    dynamic = None if batch else {"x": {0: torch.export.Dim("batch", min=1, max=1024)}}
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # the exporter's progress lines
        warnings.simplefilter("ignore")
        program = torch.onnx.export(twin, (example,), dynamo=True, opset_version=ONNX_OPSET, input_names=["image"],
                                    output_names=["logits"], dynamic_shapes=dynamic, verbose=False)
    proto = program.model_proto
    for key, value in export_metadata(model, image_size, "NCHW").items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, tmp)


def run_onnx(path: str, images_nhwc: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: images_nhwc.transpose(0, 3, 1, 2)})[0]


def onnx_conv_count(path: str) -> Dict[str, int]:
    import onnx

    graph = onnx.load(path).graph
    ops = [node.op_type for node in graph.node]
    return {op: ops.count(op) for op in set(ops)}


# --------------------------------------------------------------------------- TFLite
def write_tflite(tmp: str, model: Any, variables: Any, image_size: int, batch: Optional[int],
                 float16: bool = False) -> None:
    import tensorflow as tf

    from fastvit_jax.tf_forward import forward

    host = jax_to_numpy(variables)
    spec = tf.TensorSpec([batch, image_size, image_size, 3], tf.float32, name="image")
    graph = tf.function(lambda x: forward(x, host, model.cfg), input_signature=[spec], autograph=False)
    converter = tf.lite.TFLiteConverter.from_concrete_functions([graph.get_concrete_function()], graph)
    if float16:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.target_spec.supported_types = [tf.float16]
    with open(tmp, "wb") as f:
        f.write(converter.convert())


def run_tflite(path: str, images_nhwc: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    if tuple(inp["shape"]) != images_nhwc.shape:
        interpreter.resize_tensor_input(inp["index"], list(images_nhwc.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], images_nhwc)
    interpreter.invoke()
    return interpreter.get_tensor(out["index"])


# --------------------------------------------------------------------------- common
def jax_to_numpy(tree: Any) -> Any:
    import jax

    return jax.tree.map(np.asarray, tree)


def export(checkpoint: str, output: str, *, fmt: Optional[str] = None, image_size: Optional[int] = None,
           batch: Optional[int] = None, float16: bool = False, overwrite: bool = False) -> ExportResult:
    """Export ``checkpoint`` (any file ``load_model`` reads) to ``output``; see the module docstring."""
    import jax

    from fastvit_jax.io import write_atomically
    from fastvit_jax.loading import load_model
    from fastvit_variants import check_image_size

    fmt = format_of(output, fmt)
    if os.path.exists(output) and not overwrite:
        raise ExportError(f"output {output!r} exists; pass --overwrite to replace it")
    if batch is not None and batch < 1:
        raise ExportError(f"--batch must be positive, got {batch}")
    if float16 and fmt != "tflite":
        raise ExportError("--float16 applies to TFLite exports only")
    model, variables = load_model(checkpoint, inference_mode=True, lowering="native")
    size = model.pretrained_cfg.image_size if image_size is None else int(image_size)
    try:
        check_image_size(size)
    except ValueError as e:
        raise ExportError(str(e)) from None
    if fmt == "onnx":
        write = lambda tmp: write_onnx(tmp, model, variables, size, batch)  # noqa: E731
    else:
        write = lambda tmp: write_tflite(tmp, model, variables, size, batch, float16)  # noqa: E731
    check_batch = batch or 3
    images = np.random.default_rng(0).standard_normal((check_batch, size, size, 3)).astype(np.float32)
    reference = np.asarray(jax.jit(model.apply)(variables, images))  # one program, not op by op

    def write_and_verify(tmp: str) -> None:
        write(tmp)
        got = run_onnx(tmp, images) if fmt == "onnx" else run_tflite(tmp, images)
        error = relative_error(got, reference)
        if error > (1e-2 if float16 else TOLERANCE) or not (got.argmax(-1) == reference.argmax(-1)).all():
            raise ExportError(f"the {fmt} export disagrees with JAX: relative error {error:.2e}")
        verified.append(error)

    verified: list = []
    write_atomically(output, write_and_verify, overwrite=overwrite, inputs=[checkpoint])
    return ExportResult(os.path.abspath(output), fmt, model.cfg.name, size, batch, verified[0],
                        count_kernels(variables, ndim=4))


def count_kernels(variables: Any, ndim: int) -> int:
    """Number of ``kernel`` leaves with ``ndim`` dimensions (4: convolutions) in a variables tree."""
    import jax

    return sum(1 for path, leaf in jax.tree_util.tree_flatten_with_path(variables["params"])[0]
               if getattr(path[-1], "key", None) == "kernel" and np.ndim(leaf) == ndim)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_jax.export", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="weights file (.safetensors, .pth, .pth.tar), train or fused form")
    p.add_argument("output", help="file to write: .onnx or .tflite")
    p.add_argument("--format", dest="fmt", default=None, help="onnx or tflite (default: from OUTPUT's extension)")
    p.add_argument("--image_size", type=int, default=None, help="input side (default: the checkpoint's, 256)")
    p.add_argument("--batch", type=int, default=None, help="fixed batch size (default: dynamic batch)")
    p.add_argument("--float16", action="store_true", help="TFLite: store the weights in float16")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    quiet_native_logs()
    from fastvit_jax.io import WriteError
    from fastvit_jax.weights.state_dict import ConversionError

    try:
        result = export(args.checkpoint, args.output, fmt=args.fmt, image_size=args.image_size, batch=args.batch,
                        float16=args.float16, overwrite=args.overwrite)
    except (ExportError, ConversionError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    layout = "NCHW" if result.format == "onnx" else "NHWC"
    batch = "dynamic" if result.batch is None else str(result.batch)
    print(f"wrote {result.path}: fused FastViT-{result.variant}, {result.format}, input {layout} "
          f"{result.image_size}x{result.image_size}, batch {batch}; verified against JAX: "
          f"max|Δ|/max|logit| = {result.relative_error:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
