"""timm / torch_ref state_dict <-> Flax variables: key paths, leaf names and array layouts.

Rules (design.md "Conventions"):
- key path: ``stages.0.blocks.1.mlp.fc1.weight`` <-> ``stages_0/blocks_1/mlp/fc1/kernel``
  (a numeric segment joins the name before it; only the list names stem, stages, blocks,
  conv_kxk and proj are indexed);
- conv weight (O, I/g, kh, kw) <-> kernel (kh, kw, I/g, O); linear (O, I) <-> (I, O);
- BatchNorm weight/bias <-> params scale/bias, running_mean/var <-> batch_stats mean/var,
  ``num_batches_tracked`` dropped (and written back as 0);
- layer scale gamma (C, 1, 1) <-> (C,).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

_INDEXED = ("stem", "stages", "blocks", "conv_kxk", "proj")
_FLAX_INDEXED = re.compile(r"^(%s)_(\d+)$" % "|".join(_INDEXED))


def torch_path_to_flax(module_path: str) -> Tuple[str, ...]:
    """'stages.0.blocks.1.mlp' -> ('stages_0', 'blocks_1', 'mlp')."""
    out = []
    for part in module_path.split(".") if module_path else []:
        if part.isdigit():
            if not out:
                raise ValueError(f"key path {module_path!r} starts with an index")
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def flax_path_to_torch(path: Tuple[str, ...]) -> str:
    """('stages_0', 'blocks_1', 'mlp') -> 'stages.0.blocks.1.mlp' (layer_scale_1 stays as it is)."""
    parts = []
    for p in path:
        m = _FLAX_INDEXED.match(p)
        parts.extend([m.group(1), m.group(2)] if m else [p])
    return ".".join(parts)


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def torch_to_flax(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """A timm-layout state_dict -> ``{'params': ..., 'batch_stats': ...}`` (numpy arrays, NHWC/HWIO).

    Pure renaming and transposition; validation against the model lives in ``convert.core``.
    """
    modules: Dict[str, Dict[str, Any]] = {}
    for key, value in state_dict.items():
        module, _, leaf = key.rpartition(".")
        modules.setdefault(module, {})[leaf] = value
    params: Dict[str, Any] = {}
    stats: Dict[str, Any] = {}

    def put(tree: Dict[str, Any], path: Tuple[str, ...], leaf: str, value: np.ndarray) -> None:
        node = tree
        for p in path:
            node = node.setdefault(p, {})
        node[leaf] = value

    for module, leaves in modules.items():
        path = torch_path_to_flax(module)
        is_bn = "running_mean" in leaves or "running_var" in leaves
        for leaf, value in leaves.items():
            arr = _to_numpy(value)
            if leaf == "num_batches_tracked":
                continue
            if is_bn:
                names = {"weight": ("params", "scale"), "bias": ("params", "bias"),
                         "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}
                if leaf not in names:
                    raise ValueError(f"unexpected BatchNorm entry {key_of(module, leaf)!r}")
                col, name = names[leaf]
                put(params if col == "params" else stats, path, name, arr)
            elif leaf == "gamma":
                put(params, path, "gamma", arr.reshape(-1))
            elif leaf == "weight" and arr.ndim == 4:
                put(params, path, "kernel", arr.transpose(2, 3, 1, 0))
            elif leaf == "weight" and arr.ndim == 2:
                put(params, path, "kernel", arr.T)
            elif leaf == "bias":
                put(params, path, "bias", arr)
            else:
                raise ValueError(f"cannot map {key_of(module, leaf)!r} with shape {arr.shape} to a Flax variable")
    return {"params": params, "batch_stats": stats}


def key_of(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def flax_to_torch(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Flax variables -> a timm-layout state_dict of numpy arrays (NCHW/OIHW).

    BatchNorms get ``num_batches_tracked`` = 0 so that ``load_state_dict(strict=True)`` works.
    """
    out: Dict[str, np.ndarray] = {}

    def walk(path: Tuple[str, ...], node: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        module = flax_path_to_torch(path)
        if "scale" in leaves:  # BatchNorm
            out[key_of(module, "weight")] = np.asarray(leaves["scale"])
            out[key_of(module, "bias")] = np.asarray(leaves["bias"])
            out[key_of(module, "running_mean")] = np.asarray(stats["mean"])
            out[key_of(module, "running_var")] = np.asarray(stats["var"])
            out[key_of(module, "num_batches_tracked")] = np.zeros((), np.int64)
        else:
            for leaf, value in leaves.items():
                arr = np.asarray(value)
                if leaf == "gamma":
                    out[key_of(module, "gamma")] = arr.reshape(-1, 1, 1)
                elif leaf == "kernel" and arr.ndim == 4:
                    out[key_of(module, "weight")] = arr.transpose(3, 2, 0, 1)
                elif leaf == "kernel" and arr.ndim == 2:
                    out[key_of(module, "weight")] = arr.T
                elif leaf == "bias":
                    out[key_of(module, "bias")] = arr
                else:
                    raise ValueError(f"cannot map Flax variable {'/'.join(path + (leaf,))} with shape {arr.shape}")
        for name, child in node.items():
            if isinstance(child, Mapping):
                walk(path + (name,), child, stats.get(name, {}) if isinstance(stats, Mapping) else {})

    walk((), variables["params"], variables.get("batch_stats", {}))
    return {k: np.ascontiguousarray(v) if v.ndim else v for k, v in out.items()}
