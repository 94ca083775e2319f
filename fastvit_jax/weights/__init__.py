"""Weights files and PyTorch layouts on the JAX side (no PyTorch needed except to read pickles).

  keys        timm / torch_ref key paths and array layouts <-> Flax variables
  layouts     Apple's ml-fastvit keys <-> timm keys (unfused and fused)
  state_dict  detect layout, form and variant of a state_dict; convert it to Flax variables and back
  files       read any weights file (Flax .safetensors, PyTorch .safetensors, .pth pickles)
"""

from fastvit_jax.weights.files import WeightsFile, load_weights, read_variables, read_weights_file  # noqa: F401
from fastvit_jax.weights.state_dict import (  # noqa: F401
    ConversionError,
    ConversionResult,
    convert_state_dict,
    describe_variables,
    variables_to_arrays,
)
