"""Checkpoint conversion library: PyTorch (torch_ref / timm / Apple layouts) <-> Flax variables.

Every check names what is wrong and what would be right; all failures raise
``ConversionError`` (the CLIs turn it into a message and exit code 2).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

import torch_ref
from convert.layouts import LAYOUTS, apple_to_timm, detect_layout, timm_to_apple
from convert.mapping import flax_to_torch, torch_to_flax
from fastvit_jax.variants import VARIANTS, canonical_name, get_variant

FORMS = ("train", "fused")
_WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")
_MAX_LISTED = 5


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what was expected."""


@dataclasses.dataclass
class ConversionResult:
    variables: Dict[str, Any]
    variant: str
    layout: str        # layout of the source checkpoint: 'timm' or 'apple'
    source_form: str   # 'train' or 'fused'
    form: str          # form of ``variables``
    num_classes: int
    num_params: int


# --------------------------------------------------------------------------- loading
def load_torch_checkpoint(path: str, prefer_ema: bool = False) -> Dict[str, torch.Tensor]:
    """Read ``.pth`` / ``.pth.tar`` (bare or wrapped in state_dict / model / state_dict_ema, ``module.``
    prefixes stripped) or ``.safetensors``; only tensors are accepted (``weights_only=True``)."""
    if not os.path.isfile(path):
        raise ConversionError(f"checkpoint {path!r} does not exist")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            obj = load_file(path)
        except Exception as e:  # safetensors raises several types for corrupt files
            raise ConversionError(f"{path!r} is not a readable .safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unpickling / zip errors for non-checkpoints
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConversionError(
                f"{path!r} is not a PyTorch checkpoint that loads with weights_only=True "
                f"(tensors and plain containers only): {first}") from None
    return unwrap_state_dict(obj, prefer_ema=prefer_ema, source=path)


def unwrap_state_dict(obj: Any, prefer_ema: bool = False, source: str = "checkpoint") -> Dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source!r} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    order = ("state_dict_ema", "model_ema", "state_dict", "model") if prefer_ema else _WRAPPERS
    for name in order:
        if isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    sd = {}
    for key, value in obj.items():
        if not isinstance(value, torch.Tensor):
            raise ConversionError(
                f"{source!r}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state_dict, "
                f"optionally wrapped under one of {', '.join(_WRAPPERS)}")
        sd[key[len("module."):] if key.startswith("module.") else key] = value
    if not sd:
        raise ConversionError(f"{source!r} holds an empty state_dict")
    return sd


# --------------------------------------------------------------------------- expectations
@functools.lru_cache(maxsize=None)
def expected_shapes(variant: str, fused: bool, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """timm-layout key -> shape of torch_ref's state_dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = torch_ref.create_model(variant, num_classes=num_classes, inference_mode=fused)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@dataclasses.dataclass
class _Mismatch:
    missing: List[str]
    unexpected: List[str]
    shapes: List[Tuple[str, Tuple[int, ...], Tuple[int, ...]]]  # key, expected, found

    @property
    def count(self) -> int:
        return len(self.missing) + len(self.unexpected) + len(self.shapes)

    def describe(self) -> str:
        parts = []

        def listing(keys):
            more = f", ... ({len(keys)} in all)" if len(keys) > _MAX_LISTED else f" ({len(keys)})"
            return ", ".join(keys[:_MAX_LISTED]) + more

        if self.missing:
            parts.append(f"missing keys: {listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys: {listing(self.unexpected)}")
        for key, exp, found in self.shapes[:_MAX_LISTED]:
            parts.append(f"shape mismatch at {key}: expected {exp}, found {found}")
        if len(self.shapes) > _MAX_LISTED:
            parts.append(f"... {len(self.shapes)} shape mismatches in all")
        return "; ".join(parts)


def _compare(found: Mapping[str, Tuple[int, ...]], expected: Mapping[str, Tuple[int, ...]]) -> _Mismatch:
    return _Mismatch(
        missing=[k for k in expected if k not in found],
        unexpected=[k for k in found if k not in expected],
        shapes=[(k, expected[k], found[k]) for k in expected if k in found and tuple(found[k]) != expected[k]],
    )


def _num_classes(shapes: Mapping[str, Tuple[int, ...]]) -> int:
    return int(shapes["head.fc.weight"][0]) if "head.fc.weight" in shapes else 0


def detect_variant(shapes: Mapping[str, Tuple[int, ...]], fused: bool, variant: Optional[str] = None) -> str:
    """The variant whose timm-layout keys and shapes equal ``shapes`` exactly.

    ``variant`` is a check: if given and the shapes match another variant (or none), the
    error says so, with the differences.
    """
    nc = _num_classes(shapes)
    results = {v: _compare(shapes, expected_shapes(v, fused, nc)) for v in VARIANTS}
    exact = [v for v, r in results.items() if r.count == 0]
    form = "fused" if fused else "train"
    if variant is not None:
        try:
            want = canonical_name(variant)
        except ValueError as e:
            raise ConversionError(str(e)) from None
        if results[want].count == 0:
            return want
        if exact:
            raise ConversionError(
                f"--variant {want} contradicts the checkpoint: its keys and shapes are those of {exact[0]} "
                f"({form} form); differences from {want}: {results[want].describe()}")
        raise ConversionError(f"checkpoint does not match FastViT-{want} ({form} form): {results[want].describe()}")
    if exact:
        return exact[0]
    best = min(results, key=lambda v: results[v].count)
    raise ConversionError(
        f"checkpoint matches no FastViT variant ({form} form, {nc} classes); closest is {best}: "
        f"{results[best].describe()}")


def _check_values(sd: Mapping[str, torch.Tensor]) -> None:
    for key, t in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not t.is_floating_point():
            raise ConversionError(f"{key} holds a {t.dtype} tensor; a float weight is expected there")
        if not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ConversionError(f"{key} contains {bad} NaN/Inf value(s); refusing to convert non-finite weights")


def _is_fused(keys) -> bool:
    return any(".reparam_conv." in k or k.startswith("reparam_conv.") for k in keys)


# --------------------------------------------------------------------------- torch -> flax
def convert_state_dict(state_dict: Mapping[str, torch.Tensor], *, variant: Optional[str] = None,
                       fused: bool = False) -> ConversionResult:
    """A PyTorch FastViT state_dict (timm/torch_ref or Apple layout, train or fused form) -> Flax variables.

    ``fused=True`` returns the inference form (fusing on the JAX side with
    ``fastvit_jax.reparameterize`` when the source is unfused); a fused source always
    gives the fused form. ``variant`` is checked against the shapes.
    """
    try:
        layout = detect_layout(state_dict.keys())
    except ValueError as e:
        raise ConversionError(str(e)) from None
    sd = apple_to_timm(state_dict) if layout == "apple" else dict(state_dict)
    source_fused = _is_fused(sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    found_variant = detect_variant(shapes, source_fused, variant)
    _check_values(sd)
    variables = torch_to_flax(sd)
    form = "fused" if source_fused else "train"
    if fused and not source_fused:
        import fastvit_jax

        variables = fastvit_jax.reparameterize(variables)
        form = "fused"
    num_params = sum(int(np.size(x)) for x in _leaves(variables["params"]))
    return ConversionResult(variables, found_variant, layout, "fused" if source_fused else "train", form,
                            _num_classes(shapes), num_params)


def _leaves(tree):
    if isinstance(tree, Mapping):
        for v in tree.values():
            yield from _leaves(v)
    else:
        yield tree


# --------------------------------------------------------------------------- flax -> torch
def variables_to_state_dict(variables: Mapping[str, Any], *, layout: str = "timm",
                            variant: Optional[str] = None) -> Tuple[Dict[str, torch.Tensor], str, str]:
    """Flax variables (train or fused form) -> (state_dict of torch tensors, variant, form).

    The keys are checked against torch_ref (strict), then renamed to ``layout``
    ('timm' = torch_ref / timm, 'apple' = ml-fastvit).
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    if "params" not in variables:
        raise ConversionError(f"expected Flax variables with 'params' (and 'batch_stats'); found {sorted(variables)}")
    try:
        arrays = flax_to_torch(variables)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"cannot map these variables to PyTorch keys: {e}") from None
    fused = _is_fused(arrays)
    found = detect_variant({k: tuple(v.shape) for k, v in arrays.items()}, fused, variant)
    sd = {k: torch.from_numpy(np.array(v)) for k, v in arrays.items()}
    _check_values(sd)
    if layout == "apple":
        sd = timm_to_apple(sd, get_variant(found))
    return sd, found, "fused" if fused else "train"


# --------------------------------------------------------------------------- writing
def write_atomically(path: str, write, overwrite: bool = False) -> str:
    """Call ``write(tmp_path)`` then rename to ``path``; never leaves a partial file."""
    if os.path.exists(path) and not overwrite:
        raise ConversionError(f"output {path!r} exists; pass --overwrite to replace it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise ConversionError(f"output directory {directory!r} does not exist")
    suffix = ".safetensors" if path.endswith(".safetensors") else ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_torch_state_dict(path: str, state_dict: Mapping[str, torch.Tensor], overwrite: bool = False,
                          metadata: Optional[Mapping[str, str]] = None) -> str:
    """``.safetensors`` (safetensors.torch) or ``.pth`` / ``.pth.tar`` (torch.save of a plain dict)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import save_file

        return write_atomically(path, lambda tmp: save_file(
            {k: v.contiguous() for k, v in state_dict.items()}, tmp, metadata=dict(metadata or {})), overwrite)
    if path.endswith((".pth", ".pth.tar", ".pt", ".bin")):
        return write_atomically(path, lambda tmp: torch.save(dict(state_dict), tmp), overwrite)
    raise ConversionError(f"output {path!r}: use a .safetensors, .pth or .pth.tar file name")
