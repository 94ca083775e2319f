"""fastvit_jax: FastViT (Vasu et al., ICCV 2023) and the MobileCLIP image towers in JAX/Flax linen.

``VARIANTS``: the seven ImageNet models (t8 ... ma36); ``MOBILECLIP_VARIANTS``: the MobileCLIP
towers (mci0 ... mci4); ``ALL_VARIANTS``: both.

The variant table is the pure-Python package ``fastvit_variants`` (shared with ``torch_ref``);
the other public names are loaded lazily, on first use.
"""

from fastvit_variants import (  # noqa: F401  (pure Python)
    ALL_VARIANTS,
    MOBILECLIP_VARIANTS,
    VARIANTS,
    PretrainedCfg,
    get_variant,
    pretrained_cfg,
)

_LAZY = {
    "create_model": "fastvit_jax.model",
    "FastVit": "fastvit_jax.model",
    "load_model": "fastvit_jax.loading",
    "reset_classifier": "fastvit_jax.loading",
    "reparameterize": "fastvit_jax.reparam",
    "save_variables": "fastvit_jax.io",
    "load_variables": "fastvit_jax.io",
    "eval_transform": "fastvit_jax.transforms",
    "ComputePolicy": "fastvit_jax.policy",
    "compute_policy": "fastvit_jax.policy",
}

__all__ = ["VARIANTS", "MOBILECLIP_VARIANTS", "ALL_VARIANTS", "PretrainedCfg", "get_variant", "pretrained_cfg", *_LAZY]


def __dir__():
    """The public API (the lazily loaded names included), as ``__all__``."""
    return sorted(set(globals()) | set(__all__))


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastvit_jax' has no attribute {name!r}")
