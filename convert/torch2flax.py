#!/usr/bin/env python
"""Convert a PyTorch FastViT checkpoint to Flax variables (a .safetensors file of fastvit_jax.io).

  python convert/torch2flax.py CHECKPOINT OUTPUT [--variant V] [--fused] [--ema] [--overwrite]

CHECKPOINT: .safetensors (read without PyTorch) or .pth / .pth.tar (bare, or wrapped in state_dict / model / state_dict_ema; 'module.'
prefixes stripped; needs PyTorch), in the torch_ref/timm layout or Apple's ml-fastvit layout,
unfused or fused (*_reparam). Layout, form and variant are detected from keys and shapes.
Bad input: a message naming the problem and exit code 2; OUTPUT is never half-written.
"""

from __future__ import annotations

import argparse
import os
import sys

from convert.core import ConversionError, WriteError, convert_state_dict, load_torch_checkpoint
from fastvit_jax.weights.state_dict import FLOAT_DTYPES, cast_floats


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="PyTorch checkpoint: .pth, .pth.tar or .safetensors")
    p.add_argument("output", help="Flax variables file to write (.safetensors, read by fastvit_jax.load_variables)")
    p.add_argument("--variant", help="expected variant (t8 ... ma36); checked against the shapes")
    p.add_argument("--fused", action="store_true",
                   help="write the inference (fused) form; an unfused checkpoint is fused with fastvit_jax.reparameterize")
    p.add_argument("--ema", action="store_true", help="take state_dict_ema / model_ema when the file has both")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                   help="dtype of the written weights (default float32, whatever the input's; "
                        "float16/bfloat16 keep half precision)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastvit_jax.io import same_file, save_variables
    from fastvit_jax.model import create_model

    try:
        if same_file(args.output, args.checkpoint):
            raise WriteError(f"output {args.output!r} is the input checkpoint; refusing to overwrite an input")
        if os.path.exists(args.output) and not args.overwrite:
            raise ConversionError(f"output {args.output!r} exists; pass --overwrite to replace it")
        if not args.output.endswith(".safetensors"):
            raise ConversionError(f"output {args.output!r}: Flax variables are written as .safetensors")
        print(f"[1/4] reading {args.checkpoint}", flush=True)
        sd = load_torch_checkpoint(args.checkpoint, prefer_ema=args.ema)
        print(f"[2/4] {len(sd)} tensors; detecting layout, form and variant", flush=True)
        result = convert_state_dict(sd, variant=args.variant, fused=args.fused, source=args.checkpoint)
        print(f"[3/4] {result.layout} layout, {result.source_form} form, FastViT-{result.variant}, "
              f"{result.num_classes} classes" + ("; fused on the JAX side" if result.form != result.source_form else ""),
              flush=True)
        variables, _ = cast_floats(result.variables, args.dtype)
        if result.source_dtypes != [args.dtype]:
            print(f"note: the checkpoint's weights are {'/'.join(result.source_dtypes)}; written as {args.dtype}"
                  + (" (--dtype float16 or bfloat16 keeps half precision)" if args.dtype == "float32" else ""),
                  flush=True)
        model = create_model(result.variant, num_classes=result.num_classes, inference_mode=result.form == "fused")
        meta = {"source": os.path.basename(args.checkpoint), "source_layout": result.layout}
        save_variables(args.output, variables, model=model, metadata=meta, overwrite=args.overwrite,
                       inputs=[args.checkpoint])
    except (ConversionError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[4/4] wrote {args.output}")
    print(f"summary: variant={result.variant} layout={result.layout} form={result.form} "
          f"params={result.num_params:,} classes={result.num_classes} file={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
