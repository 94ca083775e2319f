"""Classify images with a FastViT checkpoint: ``python -m fastvit_jax.predict CHECKPOINT IMAGE [IMAGE ...]``.

CHECKPOINT is any file ``fastvit_jax.load_model`` reads (the project's .safetensors, timm's
model.safetensors, .pth/.pth.tar in timm or Apple layout, unfused or fused), or a Hub name
(``hf-hub:timm/fastvit_t8.apple_in1k``). Images are read and transformed with the checkpoint's
data config (``fastvit_jax.transforms.eval_transform``). Classes are named by the data config's
``label_names`` (a fine-tuned export carries its dataset's), else ImageNet's for 1000 classes,
else by index. An embedding model (a MobileCLIP image tower, or a file without a classifier)
prints its embedding (L2 norm and the first values; ``--json``: the whole vector), never classes.

Exit status: 0 when every image was classified, 1 when some image could not be read (the
others are still classified), 2 when the checkpoint cannot be used.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Sequence

from fastvit_jax.quiet import quiet_native_logs
from fastvit_jax.transforms import MAX_ASPECT_RATIO, MAX_IMAGE_PIXELS  # noqa: E402  (pure numpy)

_CLASS_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "imagenet_classes.tsv")


def imagenet_class_names() -> List[str]:
    """The 1000 ImageNet-1k class names in index order (first synonym of each class)."""
    with open(_CLASS_FILE, encoding="utf-8") as f:
        rows = [line.rstrip("\n").split("\t") for line in f if not line.startswith("#")]
    return [names.split(", ")[0] for _, names in rows]


EMBEDDING_SHOWN = 8  # values of an embedding printed as text (--json prints all)


def is_embedding_model(model) -> bool:
    """True when the model's output is an embedding, not class logits: no classifier (num_classes 0), or a
    MobileCLIP image tower whose head is the published CLIP projection (and no class names say otherwise)."""
    from fastvit_variants import MOBILECLIP_VARIANTS, get_variant

    if model.num_classes == 0:
        return True
    cfg = model.pretrained_cfg
    return (model.cfg.name in MOBILECLIP_VARIANTS and model.num_classes == get_variant(model.cfg.name).num_classes
            and not (cfg is not None and cfg.label_names))


def class_names(model) -> Optional[List[str]]:
    """The data config's label_names, ImageNet's for an unnamed 1000-class head, else None (indices)."""
    cfg = model.pretrained_cfg
    if cfg is not None and len(cfg.label_names) == model.num_classes:
        names = list(cfg.label_names)
        return imagenet_class_names() if model.num_classes == 1000 and all(_is_synset(n) for n in names) else names
    return imagenet_class_names() if model.num_classes == 1000 else None


def _is_synset(name: str) -> bool:
    """WordNet ids as tfds's imagenet2012 names its classes (n01440764): shown as ImageNet's words."""
    return len(name) == 9 and name[0] == "n" and name[1:].isdigit()


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fastvit_jax.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="weights file (.safetensors, .pth, .pth.tar)")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, BMP, GIF)")
    p.add_argument("--top", type=int, default=5, help="classes to show per image (default 5)")
    p.add_argument("--batch_size", type=int, default=16, help="images per forward pass (default 16)")
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    p.add_argument("--ema", action="store_true", help="use the EMA weights of a wrapped PyTorch checkpoint")
    p.add_argument("--max_image_pixels", type=int, default=MAX_IMAGE_PIXELS,
                   help=f"refuse images whose header says more pixels than this (default {MAX_IMAGE_PIXELS}, PIL's "
                        "decompression-bomb limit); checked before decoding")
    p.add_argument("--max_aspect_ratio", type=float, default=MAX_ASPECT_RATIO,
                   help=f"refuse images more elongated than this (default {MAX_ASPECT_RATIO:g}:1)")
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
    quiet_native_logs()
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
    embedding = is_embedding_model(model)
    names = class_names(model)
    transform = eval_transform(model.pretrained_cfg, max_pixels=args.max_image_pixels,
                               max_aspect_ratio=args.max_aspect_ratio)
    forward = jax.jit(lambda v, x: model.apply(v, x))

    results, failed = [], 0
    for start in range(0, len(args.images), args.batch_size):  # decoded batch by batch: memory is one batch
        chunk = []
        for path in args.images[start:start + args.batch_size]:
            try:
                chunk.append((path, transform(path)[0]))
            except ImageReadError as e:
                print(f"error: {e}", file=sys.stderr)
                failed += 1
        if not chunk:
            continue
        batch = np.stack([image for _, image in chunk])
        pad = args.batch_size - len(chunk) if len(args.images) > args.batch_size else 0
        if pad:  # one compiled shape for every batch
            batch = np.concatenate([batch, np.zeros((pad,) + batch.shape[1:], batch.dtype)])
        outputs = np.asarray(forward(variables, batch))[:len(chunk)]
        if embedding:
            results += [{"image": path, "embedding": [float(v) for v in row], "norm": float(np.linalg.norm(row))}
                        for (path, _), row in zip(chunk, outputs)]
        else:
            results += [{"image": path, "top": top_k(row, args.top, names)} for (path, _), row in zip(chunk, outputs)]

    if args.json:
        print(json.dumps({"checkpoint": args.checkpoint, "variant": model.cfg.name, "results": results}, indent=2))
    else:
        for result in results:
            print(result["image"])
            if embedding:
                head = ", ".join(f"{v:+.4f}" for v in result["embedding"][:EMBEDDING_SHOWN])
                print(f"  embedding ({len(result['embedding'])} values, L2 norm {result['norm']:.4f}): [{head}, ...]")
                continue
            for rank, entry in enumerate(result["top"], 1):
                print(f"  {rank}. {entry['prob']:6.2%}  {entry['index']:>4}  {entry['label']}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
