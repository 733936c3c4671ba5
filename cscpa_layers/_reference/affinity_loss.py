"""Dense PAL, Eqs. 12-14 written out with 8 shifted copies of the normalised features.

This is what the fast layer must never do (it holds 8 x B x C x N floats plus autograd's
copies), which is why it is the benchmark baseline.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# (dy, dx), row-major without the centre; the same order as the layer's NEIGHBOUR_OFFSETS
_OFFSETS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _shifted(padded: Tensor, h: int, w: int) -> Tensor:
    """(..., H + 2, W + 2) -> (8, ..., H, W): the value at p + k for every offset k."""
    return torch.stack([padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _OFFSETS])


def pixel_affinity_dense(features: Tensor, valid: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """(cosine, N1 weights, pair validity), each (B, 8, H, W), from 8 explicit shifted copies."""
    b, c, h, w = features.shape
    normed = features / features.norm(dim=1, keepdim=True).clamp_min(eps)  # (B, C, H, W)
    neighbours = _shifted(F.pad(normed, (1, 1, 1, 1)), h, w)  # 8 copies: (8, B, C, H, W)
    cosine = (normed.unsqueeze(0) * neighbours).sum(2).transpose(0, 1)  # Eq. 12: (B, 8, H, W)
    valid_padded = F.pad(valid.float(), (1, 1, 1, 1)) > 0  # off-image neighbours are invalid
    pair_valid = _shifted(valid_padded, h, w).transpose(0, 1) & valid.unsqueeze(1)  # (B, 8, H, W)
    cosine = torch.where(pair_valid, cosine, torch.zeros_like(cosine))
    weights = cosine / cosine.abs().sum(1, keepdim=True).clamp_min(eps)  # N1
    return cosine, weights, pair_valid


def pixel_affinity_loss_dense(
    features: Tensor,
    target: Tensor,
    confidence: Tensor | None = None,
    target_features: Tensor | None = None,
    threshold: float = 0.8,
    ignore_index: int = 255,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    """Eqs. 12-14 with the 8 shifted copies in memory; same contract as ``pixel_affinity_loss``."""
    b, c, h, w = features.shape
    valid = target != ignore_index
    if confidence is not None:
        valid = valid & (confidence >= threshold)
    _, weights, pair_valid = pixel_affinity_dense(features, valid, eps)
    signs = torch.where(target > 0, 1.0, -1.0).to(weights.dtype)
    neighbour_signs = _shifted(F.pad(signs, (1, 1, 1, 1)), h, w).transpose(0, 1)  # M_k, (B, 8, H, W)
    g_pred = (weights * neighbour_signs).sum(1)  # Eq. 13
    count = pair_valid.sum(1)
    if target_features is None:
        g_target = (pair_valid * neighbour_signs).sum(1) / count.clamp_min(1)
    else:
        _, target_weights, _ = pixel_affinity_dense(target_features.detach(), valid, eps)
        g_target = (target_weights * neighbour_signs).sum(1)
    q_t = ((g_target + 1) / 2).clamp(eps, 1 - eps)
    q_p = ((g_pred + 1) / 2).clamp(eps, 1 - eps)
    kl = q_t * torch.log(q_t / q_p) + (1 - q_t) * torch.log((1 - q_t) / (1 - q_p))  # Eq. 14
    counted = count > 0
    loss = torch.where(counted, kl, torch.zeros_like(kl))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if not bool(counted.any()):
        return 0 * features.sum()
    return loss.sum() / counted.sum()


__all__ = ["pixel_affinity_dense", "pixel_affinity_loss_dense"]
