"""fastvit_jax: FastViT (Vasu et al., ICCV 2023) in JAX/Flax linen.

The public names are loaded lazily so that ``fastvit_jax.variants`` (pure Python)
can be imported without JAX, e.g. by ``torch_ref``.
"""

from fastvit_jax.variants import VARIANTS, get_variant  # noqa: F401  (pure Python)

_LAZY = {
    "create_model": "fastvit_jax.model",
    "FastViT": "fastvit_jax.model",
    "reparameterize": "fastvit_jax.reparam",
    "save_variables": "fastvit_jax.io",
    "load_variables": "fastvit_jax.io",
}

__all__ = ["VARIANTS", "get_variant", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastvit_jax' has no attribute {name!r}")
