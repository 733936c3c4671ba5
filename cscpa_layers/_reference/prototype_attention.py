"""Dense FPA, Eqs. 1-6 written out with the correlation map and the N x N matrix in memory."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _correlation(x: Tensor, eps: float) -> Tensor:
    feats = x.flatten(2)  # (B, C, N)
    weights = torch.softmax(feats, dim=-1)  # Eq. 1: spatial softmax per channel
    protos = torch.einsum("bcn,bdn->bcd", weights, feats)  # Eq. 2: (B, C, C)
    protos = protos / protos.norm(dim=-1, keepdim=True).clamp_min(eps)
    pixels = feats / feats.norm(dim=1, keepdim=True).clamp_min(eps)
    return torch.einsum("bcd,bdn->bcn", protos, pixels)  # Eq. 3: Phi, (B, C, N)


def foreground_prototype_attention_dense(
    x: Tensor,
    partner: Tensor | None,
    key_weight: Tensor,
    key_bias: Tensor,
    value_weight: Tensor,
    value_bias: Tensor,
    out_weight: Tensor,
    out_bias: Tensor,
    *,
    values: str = "self",
    eps: float = 1e-6,
    kv_stride: int = 1,
    residual: bool = True,
) -> Tensor:
    """x + F_f (F_f alone without ``residual``) with an explicit (B, N, N') attention matrix;
    ``partner=None`` swaps halves.

    With ``kv_stride`` s > 1, keys and values are multiplied by an explicit (M, N') averaging
    matrix (one row per s x s window, partial windows at odd edges averaging what they hold).
    """
    b, c, h, w = x.shape
    if partner is None:
        partner = torch.cat([x[b // 2 :], x[: b // 2]])
    phi_x = _correlation(x, eps).transpose(1, 2)  # tokens, (B, N, C)
    phi_p = _correlation(partner, eps).transpose(1, 2)  # (B, N', C)
    key_x = phi_x @ key_weight.T + key_bias  # Eq. 4, shared L_k: (B, N, d)
    key_p = phi_p @ key_weight.T + key_bias  # (B, N', d)
    source = phi_x if values == "self" else phi_p
    value = source @ value_weight.T + value_bias  # (B, N', d)
    if kv_stride > 1:
        key_p = _window_means(partner.shape[2], partner.shape[3], kv_stride).to(key_p) @ key_p  # (B, M, d)
        size = x.shape[2:] if values == "self" else partner.shape[2:]
        value = _window_means(size[0], size[1], kv_stride).to(value) @ value
    scores = key_x @ key_p.transpose(1, 2) / math.sqrt(key_weight.shape[0])  # (B, N, N')
    attended = torch.softmax(scores, dim=-1) @ value  # Eq. 5: (B, N, d)
    update = (attended @ out_weight.T + out_bias).transpose(1, 2).reshape(b, c, h, w)  # F_f
    return x + update if residual else update  # Eq. 6


def _window_means(h: int, w: int, stride: int) -> Tensor:
    """(M, H*W) matrix whose row m averages the pixels of the m-th stride x stride window."""
    rows = []
    for top in range(0, h, stride):
        for left in range(0, w, stride):
            window = torch.zeros(h, w, dtype=torch.float64)
            window[top : top + stride, left : left + stride] = 1.0
            rows.append(window.flatten() / window.sum())
    return torch.stack(rows)


def channel_prototypes_dense(x: Tensor) -> Tensor:
    """Eqs. 1-2 with an explicit sum over pixels."""
    feats = x.flatten(2)
    weights = torch.softmax(feats, dim=-1)
    return (weights.unsqueeze(2) * feats.unsqueeze(1)).sum(-1)  # (B, C, C)


def correlation_map_dense(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Eq. 3 as (B, C, H, W)."""
    return _correlation(x, eps).view(x.shape)


__all__ = ["channel_prototypes_dense", "correlation_map_dense", "foreground_prototype_attention_dense"]
