"""The set kept for the backward pass of a training step, per image, under each remat policy.

Measured from the traced program (no compile, no run): JAX's own list of the residuals the
backward of ``loss(params)`` keeps (``jax._src.ad_checkpoint.saved_residuals``; the public
``jax.ad_checkpoint.print_saved_residuals`` prints the same list), summed in bytes at two batch
sizes; the difference divided by the batch difference is the per-image figure (parameters and
other per-step constants cancel out). Train mode (BatchNorm on batch statistics), the 'native'
conv lowering (the accelerators' one), bfloat16 compute unless --dtype float32.

    python -m benchmarks.saved_set --variants t8 sa12 ma36 --image_size 256
"""

from __future__ import annotations

import argparse
import json
from typing import Dict, Sequence

from fastvit_jax.remat import REMAT_POLICIES


def saved_bytes(variant: str, remat: str, batch: int, image_size: int, dtype: str = "bfloat16",
                lowering: str = "native") -> int:
    """Bytes of the residuals the backward of one train-mode loss keeps, for ``batch`` images."""
    import jax
    import jax.numpy as jnp
    from jax._src.ad_checkpoint import saved_residuals

    import fastvit_jax

    model = fastvit_jax.create_model(variant, num_classes=1000, dtype=jnp.dtype(dtype), lowering=lowering,
                                     remat=remat)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3))))
    variables = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)  # traced, never run
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)

    def loss(params, images):
        logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images, train=True,
                                mutable=["batch_stats"])
        return logits.sum()

    residuals = saved_residuals(loss, variables["params"], x)
    return sum(int(aval.size) * aval.dtype.itemsize for aval, _ in residuals if hasattr(aval, "dtype"))


def per_image(variant: str, remat: str, image_size: int, dtype: str = "bfloat16", batches=(2, 4)) -> float:
    """Saved bytes per image: the slope between two batch sizes."""
    small, large = (saved_bytes(variant, remat, b, image_size, dtype) for b in batches)
    return (large - small) / (batches[1] - batches[0])


def table(variants: Sequence[str], image_size: int, dtype: str = "bfloat16") -> Dict[str, Dict[str, float]]:
    """{variant: {policy: MB per image}}."""
    return {v: {p: per_image(v, p, image_size, dtype) / 1e6 for p in REMAT_POLICIES} for v in variants}


def markdown(result: Dict[str, Dict[str, float]], image_size: int, dtype: str) -> str:
    lines = [f"| variant ({image_size} px, {dtype}) | " + " | ".join(f"remat {p}" for p in REMAT_POLICIES) + " |",
             "|---" * (len(REMAT_POLICIES) + 1) + "|"]
    for variant, row in result.items():
        lines.append(f"| {variant} | " + " | ".join(f"{row[p]:.1f} MB/img" for p in REMAT_POLICIES) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", nargs="+", default=["t8", "sa12", "ma36"])
    p.add_argument("--image_size", type=int, default=256)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    result = table(args.variants, args.image_size, args.dtype)
    print(json.dumps(result, indent=1) if args.json else markdown(result, args.image_size, args.dtype))


if __name__ == "__main__":
    main()
