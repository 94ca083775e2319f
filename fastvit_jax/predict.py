"""Classify images with a FastViT checkpoint: ``python -m fastvit_jax.predict CHECKPOINT IMAGE [IMAGE ...]``.

CHECKPOINT is any file ``fastvit_jax.load_model`` reads (the project's .safetensors, timm's
model.safetensors, .pth/.pth.tar in timm or Apple layout, unfused or fused). Images are read
and transformed with the checkpoint's data config (``fastvit_jax.transforms.eval_transform``);
1000-class models print ImageNet class names, others class indices.

Exit status: 0 when every image was classified, 1 when some image could not be read (the
others are still classified), 2 when the checkpoint cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_CLASS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.tsv")


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in index order (first synonym of each class)."""
    with open(_CLASS_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return [names.split(", ")[0] for _, names in rows]


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="weights file (.safetensors, .pth, .pth.tar)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, GIF)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a wrapped PyTorch checkpoint")
    args = p.parse_args(argv)
    if args.top < 1 or args.batch_size < 1:
        p.error("--top and --batch_size must be positive")
    return args


def top_k(logits, k: int, names: Optional[List[str]]) -> List[Dict[str, object]]:
    """Softmax top-k of one logit vector: [{'index', 'label', 'prob'}], most probable first."""
    import numpy as np

    logits = np.asarray(logits, np.float64)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"index": int(i), "label": names[i] if names else str(int(i)), "prob": float(probs[i])} for i in order]


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    import jax
    import numpy as np

    from fastvit_jax.loading import load_model
    from fastvit_jax.transforms import ImageReadError, eval_transform
    from fastvit_jax.weights.state_dict import ConversionError

    try:
        model, variables = load_model(args.checkpoint, inference_mode=True, prefer_ema=args.ema)
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if model.num_classes == 0:
        print(f"error: {args.checkpoint!r} has no classifier head (num_classes 0); nothing to predict", file=sys.stderr)
        return 2
    names = imagenet_class_names() if model.num_classes == 1000 else None
    transform = eval_transform(model.pretrained_cfg)
    forward = jax.jit(lambda v, x: model.apply(v, x))

    ready, failed = [], 0
    for path in args.images:
        try:
            ready.append((path, transform(path)[0]))
        except ImageReadError as e:
            print(f"error: {e}", file=sys.stderr)
            failed += 1
    results = []
    for start in range(0, len(ready), args.batch_size):
        chunk = ready[start:start + args.batch_size]
        batch = np.stack([image for _, image in chunk])
        pad = args.batch_size - len(chunk) if len(ready) > args.batch_size else 0
        if pad:  # one compiled shape for every batch
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        logits = np.asarray(forward(variables, batch))[:len(chunk)]
        results += [{"image": path, "top": top_k(row, args.top, names)} for (path, _), row in zip(chunk, logits)]

    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "variant": model.cfg.name, "results": results}, indent=2))
    else:
        for result in results:
            print(result["image"])
            for rank, entry in enumerate(result["top"], 1):
                print(f"  {rank}. {entry['prob']:6.2%}  {entry['index']:>4}  {entry['label']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
