"""torch_ref: the FastViT family in PyTorch, faithful to Apple's ml-fastvit, timm's names;
also the MobileCLIP image towers (mci0 ... mci4, timm's ``fastvit_mci*``).

Imports no JAX: the variant table it shares with ``fastvit_jax`` is the pure-Python package
``fastvit_variants``, so neither twin imports the other.
"""

from torch_ref.model import FastVit, create_model, reparameterize_model  # noqa: F401
from fastvit_variants import ALL_VARIANTS, MOBILECLIP_VARIANTS, VARIANTS  # noqa: F401

__all__ = ["FastVit", "create_model", "reparameterize_model", "VARIANTS", "MOBILECLIP_VARIANTS", "ALL_VARIANTS"]
