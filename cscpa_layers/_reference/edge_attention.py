"""Literal EPA: a per-pixel edge mask, Eq. 7 as a matrix product, Eqs. 9-10 pixel by pixel."""

from __future__ import annotations

import torch
from torch import Tensor


def edge_mask_dense(labels: Tensor, ignore_index: int = 255) -> Tensor:
    """Visit every pixel and its 8 neighbours; an edge sees two classes among valid pixels."""
    b, h, w = labels.shape
    out = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                if int(labels[i, y, x]) == ignore_index:
                    continue
                classes = set()
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < h and 0 <= xx < w and int(labels[i, yy, xx]) != ignore_index:
                            classes.add(int(labels[i, yy, xx]))
                out[i, y, x] = len(classes) > 1
    return out.to(labels.device)


def container_update_dense(drawn: Tensor, bank: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Eq. 7: C_h[i] = sum_j W[i, j] [E_h; C_{h-1}][j] + b[i], over the 2n stacked slots."""
    stacked = torch.cat([drawn, bank])  # (2n, C)
    return torch.einsum("ij,jc->ic", weight, stacked) + bias[:, None]  # (n, C)


def edge_prototype_attention_dense(
    x: Tensor,
    prototype: Tensor,
    *,
    temperature: float = 1.0,
    rescale: bool = True,
    gain: Tensor | float = 1.0,
    eps: float = 1e-6,
    residual: bool = True,
) -> Tensor:
    """x + g F_e (g F_e alone without ``residual``) with the cosine of every pixel, an explicit
    softmax and an explicit outer product."""
    b, c, h, w = x.shape
    n = h * w
    feats = x.reshape(b, c, n)  # (B, C, N)
    p_unit = prototype / prototype.norm().clamp_min(eps)  # (C,)
    f_unit = feats / feats.norm(dim=1, keepdim=True).clamp_min(eps)  # (B, C, N)
    cos = (p_unit[None, :, None] * f_unit).sum(1)  # Eq. 9 cosine, (B, N)
    scores = torch.exp(cos / temperature)
    phi = scores / scores.sum(dim=1, keepdim=True)  # softmax over the N pixels, (B, N)
    if rescale:
        phi = phi * n
    f_e = gain * torch.einsum("bn,c->bcn", phi, prototype).reshape(b, c, h, w)  # Eq. 10, outer product
    return x + f_e if residual else f_e


__all__ = ["container_update_dense", "edge_mask_dense", "edge_prototype_attention_dense"]
