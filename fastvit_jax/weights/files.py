"""Read any FastViT weights file, without PyTorch unless the file is a pickle.

The one home of reading weights: ``read_weights_file`` (what the file holds, as it is),
``load_weights`` (FastViT variables, variant and form checked; ``load_model`` and the CLIs)
and ``read_variables`` (any Flax tree, for the trainer). Accepted files:

- ``.safetensors`` written by ``fastvit_jax.save_variables`` (Flax variables + metadata);
- ``.safetensors`` holding a PyTorch state_dict (timm's ``model.safetensors``, converter outputs);
- ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.bin`` pickles (timm or Apple layout, bare or wrapped in
  ``state_dict`` / ``model`` / ``state_dict_ema``), read with ``torch.load(weights_only=True)``:
  nothing but tensors is unpickled. Only this case imports torch.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import warnings
import zipfile
from typing import Any, Dict, Optional

from fastvit_jax.io import is_variables_file, unflatten_variables
from fastvit_jax.weights.state_dict import (
    ConversionError,
    ConversionResult,
    cast_floats,
    check_values,
    convert_state_dict,
    count_params,
    describe_variables,
    unwrap_state_dict,
)

PICKLE_SUFFIXES = (".pth", ".pth.tar", ".pt", ".bin", ".ckpt")


@dataclasses.dataclass
class WeightsFile:
    """What a file holds: Flax ``variables`` (kind 'flax') or a PyTorch ``state_dict`` (kind 'torch')."""

    path: str
    kind: str
    tensors: Dict[str, Any]
    metadata: Dict[str, Any]


def check_readable(path: str) -> None:
    """A regular, readable file; otherwise a ConversionError that says what the path is."""
    if not os.path.lexists(path):
        raise ConversionError(f"checkpoint {path!r} does not exist")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:  # a link that loops, or points at nothing
        if e.errno == errno.ELOOP:
            raise ConversionError(f"checkpoint {path!r} is a symbolic link that loops back on itself") from None
        target = os.readlink(path) if os.path.islink(path) else "?"
        raise ConversionError(f"checkpoint {path!r} is a symbolic link to {target!r}, which does not exist") from None
    if stat.S_ISDIR(mode):
        raise ConversionError(f"checkpoint {path!r} is a directory, not a weights file")
    if not stat.S_ISREG(mode):
        raise ConversionError(f"checkpoint {path!r} is not a regular file (a FIFO, socket or device)")
    if not os.access(path, os.R_OK):
        raise ConversionError(f"checkpoint {path!r} is not readable (permission denied)")


def _decode_metadata(raw: Dict[str, str]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _read_safetensors(path: str, prefer_ema: bool) -> WeightsFile:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            raw_meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise ConversionError(f"{path!r} is not a readable .safetensors file: {e}") from None
    metadata = _decode_metadata(raw_meta)
    if is_variables_file(tensors, raw_meta):
        check_values(tensors, path)  # NaN / Inf, named (the PyTorch layouts are checked when converted)
        return WeightsFile(path, "flax", unflatten_variables(tensors), metadata)
    return WeightsFile(path, "torch", unwrap_state_dict(tensors, prefer_ema, source=path), metadata)


# Tensor data in a PyTorch zip is stored uncompressed, and float weights do not compress
# much: an archive whose entries claim more than this many times its own size is refused
# before anything is read (a few MB claiming GBs would otherwise be allocated).
MAX_ZIP_EXPANSION = 2.0


def check_zip_sizes(path: str) -> None:
    """ConversionError when a zip checkpoint claims far more tensor bytes than the file holds."""
    if not zipfile.is_zipfile(path):
        return  # the legacy (non-zip) format: nothing is claimed up front
    size = os.path.getsize(path)
    try:
        with zipfile.ZipFile(path) as archive:
            claimed = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise ConversionError(f"{path!r} is a damaged zip archive: {e}") from None
    if claimed > MAX_ZIP_EXPANSION * size + 2**20:
        raise ConversionError(
            f"{path!r} claims {claimed / 2**20:.0f} MiB of tensors in a {size / 2**20:.1f} MiB file (a damaged or "
            f"hostile archive: PyTorch stores tensors uncompressed); refusing to load it")


def _unpickling_error(error: Exception) -> str:
    """What stopped torch's safe unpickler (e.g. "unsupported GLOBAL posix.system"), without torch's
    advice to retry with weights_only=False; else the error's first line."""
    text = str(error).strip()
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation")
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    reasons = [p.replace("WeightsUnpickler error:", "").strip() for p in paragraphs if not p.startswith(advice)]
    reasons = [r for r in reasons if r]
    if reasons:
        return " ".join(" ".join(r.split()) for r in reasons)
    return text.splitlines()[0] if text else type(error).__name__


def _read_pickle(path: str, prefer_ema: bool) -> WeightsFile:
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path!r} is a PyTorch pickle; reading it needs PyTorch (pip install torch==2.13.0). "
            "Without PyTorch, use the .safetensors version of the checkpoint (timm publishes model.safetensors)"
        ) from None
    check_zip_sizes(path)
    try:
        with warnings.catch_warnings():  # its note on unusual pickle protocols: the error below says enough
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling / zip errors for non-checkpoints
        raise ConversionError(
            f"{path!r} is not a PyTorch checkpoint that loads with weights_only=True "
            f"(tensors and plain containers only; nothing in it was run): {_unpickling_error(e)}") from None
    return WeightsFile(path, "torch", unwrap_state_dict(obj, prefer_ema, source=path), {})


def read_weights_file(path: str | os.PathLike, *, prefer_ema: bool = False) -> WeightsFile:
    """Read ``path`` (see the module docstring); ``prefer_ema`` takes EMA weights from wrapped pickles."""
    path = os.fspath(path)
    check_readable(path)
    if path.endswith(".safetensors"):
        return _read_safetensors(path, prefer_ema)
    if path.endswith(PICKLE_SUFFIXES):
        return _read_pickle(path, prefer_ema)
    raise ConversionError(f"{path!r}: unknown checkpoint type; expected .safetensors, "
                          f"or a PyTorch pickle ({', '.join(PICKLE_SUFFIXES)})")


def read_variables(path: str | os.PathLike, *, prefer_ema: bool = False) -> Dict[str, Any]:
    """Any weights file -> {'params': ..., 'batch_stats': ...} of float32 numpy arrays (Flax layout).

    The trainer's reader (``--init_from``, ``--eval_only``): unlike ``load_weights`` it does not
    check a Flax tree against a FastViT variant, because the trainer checks it against its own
    model, which may be another architecture. PyTorch layouts are converted (variant and form
    detected from the tensors). ``batch_stats`` is {} for files without BatchNorm statistics.
    Raises ``ConversionError`` (a ValueError) naming the problem.
    """
    weights = read_weights_file(path, prefer_ema=prefer_ema)
    if weights.kind == "torch":
        variables = convert_state_dict(weights.tensors, source=weights.path).variables
    else:
        variables, _ = cast_floats(weights.tensors)
    return {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}


def load_weights(path: str | os.PathLike, *, variant: Optional[str] = None, fused: bool = False,
                 prefer_ema: bool = False) -> ConversionResult:
    """Any weights file -> Flax variables, with variant, layout and form detected from keys and shapes.

    ``fused=True`` returns the inference form (fused on the JAX side when the file is unfused).
    ``variant`` is checked against the shapes. The file's metadata is in ``result.metadata``.
    """
    path = os.fspath(path)
    weights = read_weights_file(path, prefer_ema=prefer_ema)
    if weights.kind == "torch":
        result = convert_state_dict(weights.tensors, variant=variant, fused=fused, source=path)
    else:
        variables = {k: weights.tensors[k] for k in ("params", "batch_stats") if k in weights.tensors}
        found, form, num_classes = describe_variables(variables, variant)
        variables, source_dtypes = cast_floats(variables)
        source_form = form
        if fused and form == "train":
            from fastvit_jax.reparam import reparameterize

            variables, form = reparameterize(variables), "fused"
        result = ConversionResult(variables, found, "flax", source_form, form, num_classes,
                                  count_params(variables["params"]), source_dtypes=source_dtypes)
    result.metadata = weights.metadata
    _check_metadata(result, path)
    return result


def _check_metadata(result: ConversionResult, path: str) -> None:
    """The header's variant / num_classes must agree with what the tensors are."""
    meta = result.metadata
    if "variant" in meta and str(meta["variant"]) != result.variant:
        raise ConversionError(f"{path!r}: its metadata says variant {meta['variant']!r} but its tensors are "
                              f"FastViT-{result.variant}")
    if "num_classes" in meta and int(meta["num_classes"]) != result.num_classes:
        raise ConversionError(f"{path!r}: its metadata says {meta['num_classes']} classes but its head has "
                              f"{result.num_classes}")
