#!/usr/bin/env python
"""Convert Flax FastViT variables back to a PyTorch state_dict.

  python convert/flax2torch.py VARIABLES OUTPUT [--layout timm|apple] [--variant V] [--overwrite]

VARIABLES: a file written by fastvit_jax.save_variables (torch2flax, the trainer's export).
OUTPUT: .safetensors (written without PyTorch) or .pth / .pth.tar (needs PyTorch); loads strictly into torch_ref.create_model (layout
'timm', also timm's FastViT) or Apple's ml-fastvit (layout 'apple'). Fused variables give a
fused state_dict (torch_ref.create_model(v, inference_mode=True)).
"""

from __future__ import annotations

import argparse
import os
import sys

from convert.core import ConversionError, WriteError, save_state_dict
from fastvit_jax.weights.layouts import LAYOUTS
from fastvit_jax.weights.state_dict import FLOAT_DTYPES, cast_floats, check_values, variables_to_arrays


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("variables", help="Flax variables file (.safetensors from fastvit_jax.save_variables)")
    p.add_argument("output", help="PyTorch file to write: .safetensors, .pth or .pth.tar")
    p.add_argument("--layout", choices=LAYOUTS, default="timm", help="key layout of OUTPUT (default: timm)")
    p.add_argument("--variant", help="expected variant (t8 ... ma36); checked against the shapes")
    p.add_argument("--dtype", choices=FLOAT_DTYPES, default="float32",
                   help="dtype of the written weights (default float32; float16/bfloat16 keep half precision)")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists (never the input)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from fastvit_jax.io import flatten_variables, load_variables, same_file

    try:
        if same_file(args.output, args.variables):
            raise WriteError(f"output {args.output!r} is the input file; refusing to overwrite an input")
        if os.path.exists(args.output) and not args.overwrite:
            raise ConversionError(f"output {args.output!r} exists; pass --overwrite to replace it")
        print(f"[1/3] reading {args.variables}", flush=True)
        try:
            variables = load_variables(args.variables)
        except (FileNotFoundError, ValueError) as e:
            raise ConversionError(str(e)) from None
        check_values(flatten_variables(variables), args.variables)  # NaN / Inf, named as every reader names them
        variables, source_dtypes = cast_floats(variables, "float32")
        if source_dtypes != [args.dtype]:
            print(f"note: the variables are {'/'.join(source_dtypes)}; written as {args.dtype}", flush=True)
        sd, variant, form = variables_to_arrays(variables, layout=args.layout, variant=args.variant)
        sd, _ = cast_floats(sd, args.dtype)
        print(f"[2/3] FastViT-{variant}, {form} form, {len(sd)} tensors in the {args.layout} layout", flush=True)
        save_state_dict(args.output, sd, overwrite=args.overwrite, inputs=[args.variables],
                        metadata={"variant": variant, "form": form, "layout": args.layout})
    except (ConversionError, WriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    n = sum(v.size for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    print(f"[3/3] wrote {args.output}")
    print(f"summary: variant={variant} layout={args.layout} form={form} params={n:,} file={args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
