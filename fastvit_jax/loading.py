"""From a weights file to a ready model in one call: ``load_model(path) -> (model, variables)``.

Every file the converter reads is accepted (see ``fastvit_jax.weights.files``), by path or by
Hugging Face Hub name (``hf-hub:timm/fastvit_t8.apple_in1k``, see ``fastvit_jax.hub``): the
project's own Flax ``.safetensors`` (converter outputs, trainer exports), timm's
``model.safetensors``, ``.pth`` / ``.pth.tar`` in timm's or Apple's layout, unfused or fused,
EMA-wrapped. Variant, form and layout come from the tensors themselves; the file's metadata
(written by ``save_variables(model=...)``) adds the data config and is checked against them.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from fastvit_jax import hub
from fastvit_jax.layers import trunc_normal_02
from fastvit_jax.model import FastVit, create_model
from fastvit_variants import PretrainedCfg, pretrained_cfg
from fastvit_jax.weights.files import load_weights
from fastvit_jax.weights.state_dict import ConversionError

log = logging.getLogger("fastvit_jax")


class LoadError(ConversionError):
    """A weights file that cannot give the model asked for; the message says what the file is."""


def reset_classifier(variables: Mapping[str, Any], num_classes: int, *,
                     rng: Optional[jax.Array] = None) -> Dict[str, Any]:
    """A copy of ``variables`` with a fresh ``head/fc`` of ``num_classes`` outputs (0: no classifier).

    The new kernel is drawn as the model initialises it (truncated normal, std 0.02; from
    ``rng``, default ``jax.random.key(0)``), the bias is zero. Build the matching module with
    ``create_model(variant, num_classes=num_classes, ...)``. Works on both forms.
    """
    params = dict(variables["params"])
    head = dict(params.get("head", {}))
    if "fc" not in head and num_classes == 0:
        return {**variables, "params": params}
    features = _num_features(params)
    head.pop("fc", None)
    if num_classes > 0:
        rng = jax.random.key(0) if rng is None else rng
        head["fc"] = {"kernel": trunc_normal_02(rng, (features, num_classes), jnp.float32),
                      "bias": jnp.zeros((num_classes,), jnp.float32)}
    params["head"] = head
    return {**variables, "params": params}


def _num_features(params: Mapping[str, Any]) -> int:
    """Channels entering the classifier: the output width of ``final_conv``."""
    fc = params.get("head", {}).get("fc")
    if fc is not None:
        return int(fc["kernel"].shape[0])
    for leaf in jax.tree.leaves(params["final_conv"]):
        if getattr(leaf, "ndim", 0) == 4:
            return int(leaf.shape[-1])
    raise LoadError("cannot find the classifier width: no head/fc and no final_conv kernel")


def _data_config(metadata: Mapping[str, Any], variant: str, num_classes: int) -> PretrainedCfg:
    """The file's data config (``pretrained_cfg`` entry, or its ``image_size``), else the variant's."""
    if isinstance(metadata.get("pretrained_cfg"), Mapping):
        cfg = PretrainedCfg.from_dict(metadata["pretrained_cfg"])
    else:
        size = metadata.get("image_size")
        cfg = pretrained_cfg(variant, image_size=int(size) if size is not None else None)
    return cfg.replace(variant=variant, num_classes=num_classes)


def load_model(path: str | os.PathLike, *, num_classes: Optional[int] = None, inference_mode: Optional[bool] = None,
               dtype: Any = None, rng: Optional[jax.Array] = None, variant: Optional[str] = None,
               prefer_ema: bool = False, **model_kwargs: Any) -> Tuple[FastVit, Dict[str, Any]]:
    """Load any FastViT weights file: returns ``(model, variables)`` ready for ``model.apply``.

    Args:
      path: the weights file (see the module docstring). A ``.safetensors`` file never imports torch;
        a pickle needs PyTorch and says so when it is missing.
      num_classes: a different head width replaces the classifier by a fresh one (seeded by ``rng``,
        logged); 0 removes it (``model.apply`` then returns pooled features). None keeps the file's.
      inference_mode: True returns the fused form (an unfused file is fused on the JAX side); False
        the train form (refused for a fused file: fusion cannot be undone); None the file's form.
      dtype: compute dtype of the model (params stay float32).
      variant: a check: a file of another variant is refused with a message naming what it is.
      prefer_ema: take ``state_dict_ema`` / ``model_ema`` from a wrapped PyTorch checkpoint.
      **model_kwargs: passed to ``create_model`` (``drop_path_rate``, ``lowering``, ...).

    The model's ``pretrained_cfg`` holds the file's data config (input size, crop, mean/std),
    which ``fastvit_jax.transforms.eval_transform(model.pretrained_cfg)`` applies to images.
    Raises ``LoadError`` / ``ConversionError`` (both ValueError) with a message naming the problem.
    """
    if hub.is_hub_name(path):
        path = hub.resolve(path)
    result = load_weights(path, variant=variant, fused=bool(inference_mode), prefer_ema=prefer_ema)
    if inference_mode is False and result.form == "fused":
        raise LoadError(f"{os.fspath(path)!r} holds fused (reparameterized) FastViT-{result.variant} weights, "
                        "which cannot be turned back into the train form; load it with inference_mode=True "
                        "(or None), or load the unfused checkpoint to fine-tune")
    variables = {k: v for k, v in result.variables.items() if k in ("params", "batch_stats")}
    variables.setdefault("batch_stats", {})
    classes = result.num_classes
    if num_classes is not None and num_classes != classes:
        variables = reset_classifier(variables, num_classes, rng=rng)
        log.info("load_model: replaced the %d-class head of %s by a new %d-class head (truncated normal, std 0.02)",
                 classes, os.fspath(path), num_classes)
        classes = num_classes
    model = create_model(result.variant, num_classes=classes, inference_mode=result.form == "fused",
                         dtype=jnp.float32 if dtype is None else dtype,
                         pretrained_cfg=_data_config(result.metadata, result.variant, classes), **model_kwargs)
    variables = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), variables)
    return model, variables
