"""convert: PyTorch <-> Flax checkpoint conversion for FastViT (torch_ref/timm and Apple layouts).

The torch-free library is ``fastvit_jax.weights``; these names are re-exported for convenience.
"""

from convert.core import (  # noqa: F401
    ConversionError,
    ConversionResult,
    convert_state_dict,
    load_torch_checkpoint,
    variables_to_state_dict,
)
