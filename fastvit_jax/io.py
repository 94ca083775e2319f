"""One on-disk format for Flax variables: safetensors (no pickle), flat '/'-joined keys.

``save_variables(path, variables)`` writes ``{'params': ..., 'batch_stats': ...}`` as
tensors named e.g. ``params/stages_0/blocks_1/mlp/fc1/kernel``; string metadata (variant,
form, ...) rides along in the safetensors header. Writes go to a temporary file renamed at
the end, so a failed save never leaves a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Dict, Mapping, Optional

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from fastvit_jax.variants import pretrained_cfg

FORMAT = "fastvit_jax.variables/1"


def flatten_variables(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Nested dict of arrays -> {'a/b/c': np.ndarray}."""
    flat: Dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if "/" in str(k):
                    raise ValueError(f"variable name {k!r} under {prefix!r} contains '/'")
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            arr = np.asarray(node)
            flat[prefix] = np.ascontiguousarray(arr) if arr.ndim else arr

    walk("", variables)
    return flat


def unflatten_variables(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{'a/b/c': array} -> nested dict."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def model_metadata(model: Any) -> Dict[str, Any]:
    """What a FastViT module says about its variables: variant, form, classes, data config."""
    cfg = model.pretrained_cfg or pretrained_cfg(model.cfg.name, num_classes=model.num_classes)
    return {
        "variant": model.cfg.name,
        "form": "fused" if model.inference_mode else "train",
        "num_classes": int(model.num_classes),
        "image_size": int(cfg.input_size[-1]),
        "pretrained_cfg": cfg.to_dict(),
    }


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], *, model: Any = None,
                   metadata: Optional[Mapping[str, Any]] = None) -> str:
    """Write ``variables`` to ``path`` (.safetensors) atomically; returns the path.

    ``model`` (the ``FastVit`` the variables belong to) records variant, form, num_classes,
    image size and the data config (``pretrained_cfg``) in the header, so that
    ``fastvit_jax.load_model`` needs no arguments; ``metadata`` adds or overrides entries.
    Values that are not strings are stored as JSON.
    """
    path = os.fspath(path)
    entries: Dict[str, Any] = dict(model_metadata(model)) if model is not None else {}
    entries.update(metadata or {})
    meta = {"format": FORMAT}
    for k, v in entries.items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    flat = flatten_variables(variables)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(flat, tmp, metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_variables_file(keys: Any, metadata: Optional[Mapping[str, str]]) -> bool:
    """True for a file written by ``save_variables`` (its format tag, or '/'-joined Flax keys)."""
    if (metadata or {}).get("format") == FORMAT:
        return True
    keys = list(keys)
    return bool(keys) and all(k.split("/", 1)[0] in ("params", "batch_stats") for k in keys)


def load_variables(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a file written by ``save_variables``: nested dict of numpy arrays.

    A PyTorch state_dict saved as .safetensors (timm's ``model.safetensors``) is refused with a
    pointer to ``fastvit_jax.load_model``, which reads every checkpoint layout.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no variables file at {path!r}")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file (a directory or a device?)")
    try:
        flat = load_file(path)
        meta = load_metadata(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not a safetensors variables file written by save_variables: {e}") from e
    if not is_variables_file(flat, meta):
        raise ValueError(
            f"{path!r} holds a PyTorch-layout state_dict (keys like {next(iter(flat), '?')!r}), not Flax variables; "
            "read it with fastvit_jax.load_model(path) or convert it with convert/torch2flax.py")
    return unflatten_variables(flat)


def load_metadata(path: str | os.PathLike) -> Dict[str, str]:
    """The string metadata stored by ``save_variables``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        return dict(f.metadata() or {})
