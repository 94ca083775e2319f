"""torch_ref: the FastViT family in PyTorch, faithful to Apple's ml-fastvit, timm's names.

Imports no JAX (the variant table in ``fastvit_jax.variants`` is pure Python).
"""

from torch_ref.model import FastVit, create_model, reparameterize_model  # noqa: F401
from fastvit_jax.variants import VARIANTS  # noqa: F401

__all__ = ["FastVit", "create_model", "reparameterize_model", "VARIANTS"]
