"""Weight files in and out of the trainer: merging for fine-tuning, the fused export.

The trainer reads a weight file (``--init_from``, ``--eval_only``) with
``fastvit_jax.weights.read_variables``, beside ``load_model``'s reader, so it accepts the same
files: the project's .safetensors, timm's model.safetensors, .pth/.pth.tar in timm's or Apple's
layout, unfused or fused. The structure is then checked against the model the trainer was
given (``merge_pretrained`` / ``evaluate``), not against a variant table, so a ``model_fn`` of
another architecture works too.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from fastvit_jax.io import save_variables
from fastvit_jax.model import create_model
from fastvit_jax.reparam import reparameterize
from fastvit_jax.training.config import TrainConfig
from fastvit_variants import pretrained_cfg
from fastvit_jax.weights.state_dict import ConversionError, describe_variables

EXPORT_DIRNAME = "export"
COLLECTIONS = ("params", "batch_stats")


def _flatten(tree: Any) -> Dict[tuple, Any]:
    return traverse_util.flatten_dict(flax.core.unfreeze(tree) if isinstance(tree, flax.core.FrozenDict) else tree)


def _is_head(key: tuple) -> bool:
    return bool(key) and key[0] == "head"


def _show(keys: List[tuple]) -> str:
    return ", ".join("/".join(k) for k in keys[:5]) + (" ..." if len(keys) > 5 else "")


def _identity(variables: Dict[str, Any]) -> Optional[Tuple[str, str]]:
    """(variant, form) of a FastViT variables tree, or None for anything else."""
    try:
        variant, form, _ = describe_variables(variables)
    except ConversionError:
        return None
    return variant, form


def _mismatch_hint(fresh: Dict[str, Any], loaded: Dict[str, Any]) -> str:
    """What the file holds and what to do, for a checkpoint that does not fit the model."""
    model, found = _identity(fresh), _identity(loaded)
    if found is None:
        return "(the file is not a FastViT checkpoint)"
    variant, form = found
    if form == "fused":
        return (f"(the file holds fused FastViT-{variant} weights: a fused export can be evaluated with --eval_only "
                f"but not fine-tuned; fine-tune from the unfused checkpoint)")
    if model is not None and model[0] != variant:
        return f"(the file holds FastViT-{variant} weights, this run trains {model[0]}: pass --variant {variant})"
    return f"(the file holds FastViT-{variant} weights in the train form)"


def _check_body_matches(fresh: Dict[tuple, Any], loaded: Dict[tuple, Any], collection: str,
                        hint: Callable[[], str]) -> None:
    """Raises ValueError listing missing, unexpected and wrongly shaped leaves outside the head, then ``hint()``."""
    missing = [k for k in fresh if k not in loaded and not _is_head(k)]
    unexpected = [k for k in loaded if k not in fresh and not _is_head(k)]
    wrong_shape = [k for k in fresh if k in loaded and not _is_head(k)
                   and tuple(np.shape(loaded[k])) != tuple(np.shape(fresh[k]))]
    if not (missing or unexpected or wrong_shape):
        return
    lines = [f"the checkpoint does not match the train-form model ({collection}):"]
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            lines.append(f"  {what} {len(keys)}: {_show(keys)}")
    lines.append(hint())
    raise ValueError("\n".join(lines))


def merge_pretrained(fresh: Dict[str, Any], loaded: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """Loaded weights into freshly initialised variables; the head stays fresh if its shape differs.

    Returns (variables, notes). Raises ValueError on a mismatch outside the head.
    """
    merged_variables, notes = {}, []
    for collection in COLLECTIONS:
        fresh_leaves = _flatten(fresh.get(collection, {}))
        loaded_leaves = _flatten(loaded.get(collection, {}))
        _check_body_matches(fresh_leaves, loaded_leaves, collection, lambda: _mismatch_hint(fresh, loaded))
        merged, head_reset = {}, False
        for key, value in fresh_leaves.items():
            if key in loaded_leaves and tuple(np.shape(loaded_leaves[key])) == tuple(value.shape):
                merged[key] = jnp.asarray(loaded_leaves[key], value.dtype)
            else:
                merged[key] = value
                head_reset = head_reset or _is_head(key)
        if head_reset:
            notes.append(f"new classifier head ({collection}): the checkpoint's head shape differs from num_classes")
        merged_variables[collection] = traverse_util.unflatten_dict(merged)
    return merged_variables, notes


def tree_matches(tree: Any, reference: Any) -> bool:
    """Same leaf paths and shapes."""
    leaves, reference_leaves = _flatten(tree), _flatten(reference)
    return set(leaves) == set(reference_leaves) and all(
        tuple(np.shape(leaves[k])) == tuple(np.shape(reference_leaves[k])) for k in leaves)


def _to_host(tree: Any) -> Any:
    if jax.process_count() == 1:
        return jax.device_get(tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def export_fused(workdir: str, variables: Dict[str, Any], config: TrainConfig, step: int,
                 extra_metadata: Optional[Dict[str, str]] = None, class_names: Sequence[str] = ()) -> str:
    """Reparameterizes ``variables`` and writes ``<workdir>/export/fastvit_<variant>_ema_fused.safetensors``.

    The header records the variant, form, classes and the run's data config (image size, eval
    crop, ``class_names`` as its ``label_names``), so ``fastvit_jax.load_model`` / ``predict`` / ``export`` need no arguments. Every
    process takes part (gathering sharded arrays); process 0 writes. Returns the path.
    """
    fused = reparameterize(_to_host(variables))
    path = os.path.join(workdir, EXPORT_DIRNAME, f"fastvit_{config.variant}_ema_fused.safetensors")
    if jax.process_index() == 0:
        data_config = pretrained_cfg(config.variant, num_classes=config.num_classes,
                                     image_size=config.image_size).replace(crop_pct=config.eval_crop_pct,
                                                                           label_names=tuple(class_names))
        model = create_model(config.variant, num_classes=config.num_classes, inference_mode=True,
                                         pretrained_cfg=data_config)
        metadata = {"step": step, "dataset": config.dataset, "weights": "ema", **(extra_metadata or {})}
        save_variables(path, fused, model=model, metadata=metadata,
                                   inputs=[config.init_from] if config.init_from else ())
    return path
