"""timm / torch_ref state_dict <-> Flax variables: key paths, leaf names and array layouts.

Rules:
- key path: ``stages.0.blocks.1.mlp.fc1.weight`` <-> ``stages_0/blocks_1/mlp/fc1/kernel``
  (a numeric segment joins the name before it; only the list names stem, stages, blocks,
  conv_kxk and proj are indexed);
- conv weight (O, I/g, kh, kw) <-> kernel (kh, kw, I/g, O); linear (O, I) <-> (I, O);
- BatchNorm weight/bias <-> params scale/bias, running_mean/var <-> batch_stats mean/var,
  ``num_batches_tracked`` dropped (and written back as 0);
- LayerNorm2d (mci3/mci4 attention norm) weight/bias (C,) <-> params scale/bias (no statistics);
- layer scale gamma (C, 1, 1) <-> (C,).
"""

from __future__ import annotations

import re
from typing import Any, Dict, Iterator, Mapping, Tuple

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
    """A torch tensor or array-like -> numpy (torch bfloat16 -> ml_dtypes.bfloat16, values kept)."""
    if hasattr(t, "detach"):
        t = t.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            import ml_dtypes

            return t.float().numpy().astype(ml_dtypes.bfloat16)
        t = t.numpy()
    return np.asarray(t)


def torch_to_flax(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
    """A timm-layout state_dict -> ``{'params': ..., 'batch_stats': ...}`` (numpy arrays, NHWC/HWIO).

    Pure renaming and transposition; validation against the model lives in ``fastvit_jax.weights.state_dict``.
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
            elif leaf == "weight" and arr.ndim == 1:  # LayerNorm2d
                put(params, path, "scale", arr)
            elif leaf == "bias":
                put(params, path, "bias", arr)
            else:
                raise ValueError(f"cannot map {key_of(module, leaf)!r} with shape {arr.shape} to a Flax variable")
    return {"params": params, "batch_stats": stats}


def key_of(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if module else leaf


def _flax_entries(variables: Mapping[str, Any]) -> Iterator[Tuple[str, str, Any]]:
    """Walk Flax variables: (timm key, layout rule, Flax leaf) for every PyTorch entry.

    Rules: 'same' (no change), 'conv' (HWIO -> OIHW), 'linear' (IO -> OI), 'gamma' ((C,) -> (C, 1, 1)),
    'count' (BatchNorm ``num_batches_tracked``, an int64 zero; the leaf is None).
    """

    def walk(path: Tuple[str, ...], node: Mapping[str, Any], stats: Mapping[str, Any]):
        leaves = {k: v for k, v in node.items() if not isinstance(v, Mapping)}
        module = flax_path_to_torch(path)
        if "scale" in leaves and "mean" not in stats:  # LayerNorm2d: affine only
            yield key_of(module, "weight"), "same", leaves["scale"]
            yield key_of(module, "bias"), "same", leaves["bias"]
        elif "scale" in leaves:  # BatchNorm
            yield key_of(module, "weight"), "same", leaves["scale"]
            yield key_of(module, "bias"), "same", leaves["bias"]
            yield key_of(module, "running_mean"), "same", stats["mean"]
            yield key_of(module, "running_var"), "same", stats["var"]
            yield key_of(module, "num_batches_tracked"), "count", None
        else:
            for leaf, value in leaves.items():
                ndim = len(value.shape)
                if leaf == "gamma":
                    yield key_of(module, "gamma"), "gamma", value
                elif leaf == "kernel" and ndim == 4:
                    yield key_of(module, "weight"), "conv", value
                elif leaf == "kernel" and ndim == 2:
                    yield key_of(module, "weight"), "linear", value
                elif leaf == "bias":
                    yield key_of(module, "bias"), "same", value
                else:
                    raise ValueError(f"cannot map Flax variable {'/'.join(path + (leaf,))} with shape {value.shape}")
        for name, child in node.items():
            if isinstance(child, Mapping):
                yield from walk(path + (name,), child, stats.get(name, {}) if isinstance(stats, Mapping) else {})

    yield from walk((), variables["params"], variables.get("batch_stats", {}))


def _torch_array(rule: str, value: Any) -> np.ndarray:
    if rule == "count":
        return np.zeros((), np.int64)
    arr = np.asarray(value)
    if rule == "gamma":
        arr = arr.reshape(-1, 1, 1)
    elif rule == "conv":
        arr = arr.transpose(3, 2, 0, 1)
    elif rule == "linear":
        arr = arr.T
    return np.ascontiguousarray(arr) if arr.ndim else arr


def _torch_shape(rule: str, shape: Tuple[int, ...]) -> Tuple[int, ...]:
    if rule == "count":
        return ()
    if rule == "gamma":
        return (int(np.prod(shape)), 1, 1)
    if rule == "conv":
        return tuple(shape[i] for i in (3, 2, 0, 1))
    if rule == "linear":
        return tuple(reversed(shape))
    return tuple(shape)


def flax_to_torch(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Flax variables -> a timm-layout state_dict of numpy arrays (NCHW/OIHW).

    BatchNorms get ``num_batches_tracked`` = 0 so that ``load_state_dict(strict=True)`` works.
    """
    return {key: _torch_array(rule, value) for key, rule, value in _flax_entries(variables)}


def flax_shapes_to_torch(variables: Mapping[str, Any]) -> Dict[str, Tuple[int, ...]]:
    """Like ``flax_to_torch`` on anything with ``.shape`` (e.g. ``jax.eval_shape`` output): key -> torch shape."""
    return {key: _torch_shape(rule, tuple(value.shape) if value is not None else ())
            for key, rule, value in _flax_entries(variables)}
