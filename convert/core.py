"""PyTorch-side helpers of the converter CLIs: torch tensors and files out, dtype policy.

The conversion itself (layout / form / variant detection, key and array mapping) lives in
``fastvit_jax.weights`` and needs no PyTorch; this module adds what does: state_dicts of
torch tensors and ``.pth`` files. Failures raise ``ConversionError`` (the CLIs turn it into
one message and exit code 2).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from fastvit_jax.io import WriteError, write_atomically  # noqa: F401  (re-exported for the CLIs)

from fastvit_jax.weights import ConversionError, ConversionResult, convert_state_dict  # noqa: F401
from fastvit_jax.weights.files import read_weights_file
from fastvit_jax.weights.state_dict import variables_to_arrays


def load_torch_checkpoint(path: str, prefer_ema: bool = False) -> Dict[str, np.ndarray]:
    """A PyTorch checkpoint file (``.pth``/``.pth.tar`` pickle or ``.safetensors``) -> {key: numpy array}.

    Only a pickle imports torch. A Flax variables file is refused (it is already converted).
    """
    weights = read_weights_file(path, prefer_ema=prefer_ema)
    if weights.kind != "torch":
        raise ConversionError(f"{path!r} already holds Flax variables (written by fastvit_jax.save_variables); "
                              "load it with fastvit_jax.load_model, or convert it back with convert/flax2torch.py")
    return weights.tensors


def variables_to_state_dict(variables: Mapping[str, Any], *, layout: str = "timm",
                            variant: Optional[str] = None) -> Tuple[Dict[str, Any], str, str]:
    """Flax variables (train or fused form) -> (state_dict of torch tensors, variant, form).

    The keys are checked against the model (strict), then renamed to ``layout``
    ('timm' = torch_ref / timm, 'apple' = ml-fastvit).
    """
    import torch

    arrays, found, form = variables_to_arrays(variables, layout=layout, variant=variant)
    return {k: _to_tensor(v) for k, v in arrays.items()}, found, form


def _to_tensor(value: Any) -> Any:
    """numpy (ml_dtypes.bfloat16 included) or torch -> torch tensor."""
    import torch

    if isinstance(value, torch.Tensor):
        return value
    arr = np.array(value)
    if str(arr.dtype) == "bfloat16":
        return torch.from_numpy(arr.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(arr)


def _contiguous(value: Any) -> np.ndarray:
    """A C-contiguous numpy array of ``value``'s shape (``np.ascontiguousarray`` turns a 0-d
    ``num_batches_tracked`` into shape (1,), which no FastViT reader accepts)."""
    arr = np.asarray(value)
    return np.ascontiguousarray(arr) if arr.ndim else arr


def save_state_dict(path: str, state_dict: Mapping[str, Any], *, overwrite: bool = False,
                    metadata: Optional[Mapping[str, str]] = None, inputs: Sequence[str] = ()) -> str:
    """``.safetensors`` (no torch needed) or ``.pth`` / ``.pth.tar`` (torch.save of a plain dict), atomically.

    Values: numpy arrays or torch tensors. ``inputs`` are never overwritten.
    """
    if path.endswith(".safetensors"):
        from fastvit_jax.io import write_safetensors

        arrays = {k: _contiguous(v.numpy() if hasattr(v, "numpy") else v) for k, v in state_dict.items()}
        return write_atomically(path, lambda tmp: write_safetensors(arrays, tmp, metadata=metadata),
                                overwrite=overwrite, inputs=inputs, size_hint=sum(a.nbytes for a in arrays.values()))
    if path.endswith((".pth", ".pth.tar", ".pt", ".bin")):
        import torch

        tensors = {k: _to_tensor(v) for k, v in state_dict.items()}
        return write_atomically(path, lambda tmp: torch.save(tensors, tmp), overwrite=overwrite, inputs=inputs)
    raise ConversionError(f"output {path!r}: use a .safetensors, .pth or .pth.tar file name")
