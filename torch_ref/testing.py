"""Non-trivial weights for parity tests (random-init FastViT logits barely depend on the input).

Layer scales start at 1e-5 and BN statistics at (0, 1), so a freshly built model is
nearly a constant function; comparing two such models proves little. These helpers
draw layer scales in [0.2, 0.6], random BN and LayerNorm affines, and calibrate BN running statistics
with exact averages over a few train-mode passes.
"""

from __future__ import annotations

import torch
from torch import nn

from torch_ref.layers import LayerNorm2d, LayerScale2d


@torch.no_grad()
def make_nontrivial(model: nn.Module, seed: int = 0, image_size: int | tuple = 128, batch: int = 4,
                    passes: int = 2, head_std: float = 0.2) -> nn.Module:
    """Randomize ``model`` in place (train form or fused) and return it in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LayerScale2d):
            m.gamma.copy_(torch.rand(m.gamma.shape, generator=g) * 0.4 + 0.2)
        elif isinstance(m, (nn.BatchNorm2d, LayerNorm2d)):
            m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.0 + 0.5)
            m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    head = getattr(getattr(model, "head", None), "fc", None)
    if isinstance(head, nn.Linear):
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * head_std)
        head.bias.copy_(torch.randn(head.bias.shape, generator=g) * 0.1)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: exact statistics of the calibration passes
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        model.train()
        for _ in range(passes):
            model(torch.randn(batch, 3, h, w, generator=g))
        for m, mom in zip(bns, momenta):
            m.momentum = mom
    return model.eval()

