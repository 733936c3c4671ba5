"""The toy task of the two small layer examples: find a bright disc in noise."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def make_batch(size: int, side: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Images (size, 1, side, side) with one bright disc each, and its mask (size, side, side)."""
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    centre = torch.rand(size, 2, generator=generator) * (side - 12) + 6
    radius = torch.rand(size, generator=generator) * side / 6 + 3
    dist = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    mask = (dist <= radius[:, None, None] ** 2).long()
    image = mask.float() * 0.8 + 0.5 * torch.randn(size, side, side, generator=generator)
    return image.unsqueeze(1), mask


@torch.no_grad()
def iou(net: nn.Module, images: Tensor, masks: Tensor) -> float:
    """Foreground IoU of the network's eval-mode prediction over a batch."""
    net.eval()
    pred = net(images).argmax(1)
    net.train()
    inter = ((pred == 1) & (masks == 1)).sum().item()
    union = ((pred == 1) | (masks == 1)).sum().item()
    return inter / max(union, 1)
