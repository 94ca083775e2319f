"""PyTorch FastViT state_dicts (timm / torch_ref or Apple layout) <-> Flax variables, without PyTorch.

A state_dict here is a mapping of key -> array (numpy arrays, or torch tensors, which are
converted). The expected keys and shapes of every variant come from the Flax model itself
(``jax.eval_shape``, nothing allocated), so detection needs no PyTorch. Every check names
what is wrong and what would be right; all failures raise ``ConversionError``.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import warnings
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from fastvit_jax.fusion import is_fused
from fastvit_variants import ALL_VARIANTS, canonical_name, get_variant
from fastvit_jax.weights.keys import _to_numpy, flax_shapes_to_torch, flax_to_torch, torch_to_flax
from fastvit_jax.weights.layouts import (
    LAYOUTS,
    apple_to_timm,
    clip_layout,
    detect_layout,
    image_tower,
    timm_to_apple,
)

FORMS = ("train", "fused")
WRAPPERS = ("state_dict", "model", "state_dict_ema", "model_ema")
_MAX_LISTED = 5


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message says why and what was expected."""


@dataclasses.dataclass
class ConversionResult:
    variables: Dict[str, Any]
    variant: str
    layout: str        # source layout: 'timm', 'apple', 'open_clip', 'mobileclip' ('flax' for Flax variables)
    source_form: str   # 'train' or 'fused'
    form: str          # form of ``variables``
    num_classes: int
    num_params: int
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)  # the file's header, when read from one
    source_dtypes: List[str] = dataclasses.field(default_factory=list)  # float dtypes of the input tensors


def unwrap_state_dict(obj: Any, prefer_ema: bool = False, source: str = "checkpoint") -> Dict[str, np.ndarray]:
    """A (possibly wrapped) checkpoint object -> {key: numpy array}, ``module.`` prefixes stripped.

    Wrappers: ``state_dict``, ``model``, ``state_dict_ema``, ``model_ema`` (EMA first with ``prefer_ema``).
    bfloat16 tensors become float32 (numpy has no bfloat16).
    """
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{source!r} holds a {type(obj).__name__}, not a state_dict (a dict of tensors)")
    order = ("state_dict_ema", "model_ema", "state_dict", "model") if prefer_ema else WRAPPERS
    for name in order:
        if isinstance(obj.get(name), Mapping):
            obj = obj[name]
            break
    sd = {}
    for key, value in obj.items():
        if not (hasattr(value, "shape") and hasattr(value, "dtype")):
            raise ConversionError(
                f"{source!r}: entry {key!r} is a {type(value).__name__}, not a tensor; expected a state_dict, "
                f"optionally wrapped under one of {', '.join(WRAPPERS)}")
        sd[key[len("module."):] if key.startswith("module.") else key] = _to_numpy(value)
    if not sd:
        raise ConversionError(f"{source!r} holds an empty state_dict")
    return sd


# --------------------------------------------------------------------------- expectations
@functools.lru_cache(maxsize=None)
def expected_shapes(variant: str, fused: bool, num_classes: int) -> Dict[str, Tuple[int, ...]]:
    """timm-layout key -> PyTorch shape, from the Flax model's abstract variables (no memory used)."""
    import jax
    import jax.numpy as jnp

    from fastvit_jax.model import create_model

    model = create_model(variant, num_classes=num_classes, inference_mode=fused)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False))
    return flax_shapes_to_torch(abstract)


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


def num_classes_of(shapes: Mapping[str, Tuple[int, ...]]) -> int:
    """Classifier width of a timm-layout state_dict's shapes (0 without ``head.fc``)."""
    return int(shapes["head.fc.weight"][0]) if "head.fc.weight" in shapes else 0


_BLOCK_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.")


def _candidates(shapes: Mapping[str, Tuple[int, ...]]) -> List[str]:
    """Variants whose blocks per stage equal those in the keys (all variants when none do; none
    when the keys hold no FastViT block at all)."""
    depth: Dict[int, int] = {}
    for key in shapes:
        m = _BLOCK_KEY.match(key)
        if m:
            stage, block = int(m.group(1)), int(m.group(2))
            depth[stage] = max(depth.get(stage, 0), block + 1)
    if not depth:
        return []
    layers = tuple(depth.get(s, 0) for s in range(max(depth, default=-1) + 1))
    same = [v for v in ALL_VARIANTS if get_variant(v).layers == layers]
    return same or list(ALL_VARIANTS)


def detect_variant(shapes: Mapping[str, Tuple[int, ...]], fused: bool, variant: Optional[str] = None) -> str:
    """The variant whose timm-layout keys and shapes equal ``shapes`` exactly.

    ``variant`` is a check: if given and the shapes match another variant (or none), the
    error says so, with the differences.
    """
    nc = num_classes_of(shapes)
    form = "fused" if fused else "train"
    want = None
    if variant is not None:
        try:
            want = canonical_name(variant)
        except ValueError as e:
            raise ConversionError(str(e)) from None
    names = _candidates(shapes)
    if want is not None and want not in names:
        names.append(want)
    if not names:  # each variant's expected shapes take seconds to trace: not for a tree that has no blocks
        raise ConversionError(f"checkpoint holds no FastViT blocks (no stages.<i>.blocks.<j>.* keys; {form} form, "
                              f"e.g. {', '.join(list(shapes)[:3])})")
    results = {v: _compare(shapes, expected_shapes(v, fused, nc)) for v in names}
    exact = [v for v, r in results.items() if r.count == 0]
    if want is not None:
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


def check_values(state_dict: Mapping[str, np.ndarray], source: Optional[str] = None) -> None:
    """Every weight is a floating-point array without NaN/Inf (``num_batches_tracked`` excepted).

    The one check of weight values, for every format and entry point: the project's own files are
    checked as they are read (``fastvit_jax.weights.files``), PyTorch layouts as they are converted
    (only the model's tensors: a MobileCLIP text tower is left out first). ``source`` (the file)
    leads the message.
    """
    where = f"{source!r}: " if source else ""
    for key, arr in state_dict.items():
        if key.endswith("num_batches_tracked"):
            continue
        if not is_float(arr):
            article = "an" if str(arr.dtype)[0] in "aeiou" else "a"
            raise ConversionError(f"{where}{key} holds {article} {arr.dtype} tensor; a float weight is expected there")
        finite = np.isfinite(np.asarray(arr, np.float32))
        if not finite.all():
            raise ConversionError(f"{where}{key} contains {int((~finite).sum())} NaN/Inf value(s); "
                                  "refusing to convert non-finite weights")


def is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind == "f" or str(arr.dtype) == "bfloat16"


FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def cast_floats(tree: Any, dtype: str = "float32") -> Tuple[Any, List[str]]:
    """Every floating-point array of a nested dict as ``dtype`` (one of ``FLOAT_DTYPES``), and the
    float dtypes found before the cast (sorted)."""
    if dtype not in FLOAT_DTYPES:
        raise ConversionError(f"unknown dtype {dtype!r}; valid: {', '.join(FLOAT_DTYPES)}")
    import ml_dtypes

    target = np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(dtype)
    found: set = set()

    def cast(node: Any) -> Any:
        if isinstance(node, Mapping):
            return {k: cast(v) for k, v in node.items()}
        arr = np.asarray(node)
        if not is_float(arr):
            return arr
        found.add(str(arr.dtype))
        return arr.astype(target)

    return cast(tree), sorted(found)




def count_params(params: Mapping[str, Any]) -> int:
    """Number of parameters in a (nested) Flax ``params`` tree."""
    return sum(int(np.size(v)) if not isinstance(v, Mapping) else count_params(v) for v in params.values())


# --------------------------------------------------------------------------- torch -> flax
def convert_state_dict(state_dict: Mapping[str, Any], *, variant: Optional[str] = None,
                       fused: bool = False, source: Optional[str] = None) -> ConversionResult:
    """A PyTorch FastViT state_dict -> Flax variables.

    Layouts: timm / torch_ref, Apple's ml-fastvit, and full MobileCLIP checkpoints (open_clip's
    ``visual.trunk.``, Apple MobileCLIP's ``image_encoder.model.``; their CLIP projection becomes
    ``head.fc``, and the text tower is left out with a one-line warning). Train or fused form.
    Values may be numpy arrays or torch tensors; the variables are float32 whatever the input's
    float dtype (listed in ``result.source_dtypes``). ``fused=True`` returns the inference form
    (fusing on the JAX side with ``fastvit_jax.reparameterize`` when the source is unfused);
    a fused source always gives the fused form. ``variant`` is checked against the shapes.
    ``source`` (the file the state_dict came from) names it in a NaN/Inf refusal.
    """
    clip = clip_layout(state_dict.keys())
    sd = dict(state_dict)
    try:
        if clip is not None:
            sd, left_out = image_tower(sd, clip)
            if left_out:
                warnings.warn(f"{clip} checkpoint: took the image tower, left out {len(left_out)} other entries "
                              f"(text tower etc., e.g. {left_out[0]!r})", stacklevel=2)
        inner = detect_layout(sd.keys())
    except ValueError as e:
        raise ConversionError(str(e)) from None
    sd = {k: _to_numpy(v) for k, v in sd.items()}
    layout = clip or inner
    sd = apple_to_timm(sd) if inner == "apple" else sd
    source_fused = is_fused(sd)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    found_variant = detect_variant(shapes, source_fused, variant)
    check_values(sd, source)
    sd, source_dtypes = cast_floats(sd)  # fusion and the written file are float32
    variables = torch_to_flax(sd)
    form = "fused" if source_fused else "train"
    if fused and not source_fused:
        from fastvit_jax.reparam import reparameterize

        variables = reparameterize(variables)
        form = "fused"
    return ConversionResult(variables, found_variant, layout, "fused" if source_fused else "train", form,
                            num_classes_of(shapes), count_params(variables["params"]), source_dtypes=source_dtypes)


def describe_variables(variables: Mapping[str, Any], variant: Optional[str] = None) -> Tuple[str, str, int]:
    """(variant, form, num_classes) of a Flax variables tree, checked key by key against the model."""
    if "params" not in variables:
        raise ConversionError(f"expected Flax variables with 'params' (and 'batch_stats'); found {sorted(variables)}")
    try:
        shapes = flax_shapes_to_torch(variables)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"these variables are not a FastViT tree: {e}") from None
    fused = is_fused(shapes)
    return detect_variant(shapes, fused, variant), "fused" if fused else "train", num_classes_of(shapes)


# --------------------------------------------------------------------------- flax -> torch
def variables_to_arrays(variables: Mapping[str, Any], *, layout: str = "timm",
                        variant: Optional[str] = None) -> Tuple[Dict[str, np.ndarray], str, str]:
    """Flax variables (train or fused form) -> (PyTorch state_dict as numpy arrays, variant, form).

    The keys are checked against the model (strict), then renamed to ``layout``
    ('timm' = torch_ref / timm, 'apple' = ml-fastvit).
    """
    if layout not in LAYOUTS:
        raise ConversionError(f"unknown layout {layout!r}; valid: {', '.join(LAYOUTS)}")
    found, form, _ = describe_variables(variables, variant)
    arrays = flax_to_torch(variables)
    check_values(arrays)
    if layout == "apple":
        arrays = timm_to_apple(arrays, get_variant(found))
    return arrays, found, form
