"""Confidence-based masking written as a Python loop over images and patches.

It draws its random numbers exactly as the layer does (one ``torch.rand(B, P)`` per call, patch
index in row-major order), so with the same generator state both must give the same mask.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def confidence_mask_loop(
    probs: Tensor,
    patch_size: int = 57,
    keep_hard: float = 0.7,
    mask_ratio: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, 1, H, W) bool mask, one patch at a time."""
    b, _, h, w = probs.shape
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    device = probs.device if generator is None else generator.device  # the layer's rule
    scores = torch.rand(b, rows * cols, generator=generator, device=device).to(probs.device)
    mask = torch.zeros(b, 1, h, w, dtype=torch.bool, device=probs.device)
    boxes = [
        (slice(r * patch_size, (r + 1) * patch_size), slice(c * patch_size, (c + 1) * patch_size))
        for r in range(rows)
        for c in range(cols)
    ]
    for i in range(b):
        hardness: dict[int, float] = {}
        for j, (ys, xs) in enumerate(boxes):
            patch = probs[i, :, ys, xs].double()  # (K, h', w')
            foreground = patch.argmax(0) != 0
            if foreground.any():
                entropy = -(patch * torch.where(patch > 0, patch.log(), torch.zeros_like(patch))).sum(0)
                hardness[j] = entropy[foreground].mean().item()
        # hardest first; Python's sort is stable, so ties keep row-major order
        by_hardness = sorted(hardness, key=lambda j: -hardness[j])
        kept = set(by_hardness[: math.ceil(keep_hard * len(hardness) - 1e-9)])
        others = [j for j in range(len(boxes)) if j not in kept]
        n_mask = math.ceil(mask_ratio * len(others) - 1e-9)
        chosen = sorted(others, key=lambda j: scores[i, j].item())[:n_mask]
        for j in chosen:
            ys, xs = boxes[j]
            mask[i, 0, ys, xs] = True
    return mask


__all__ = ["confidence_mask_loop"]
