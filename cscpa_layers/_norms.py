"""Per-pixel norms over the channel axis of (B, C, N) features, fast on CPU.

``x.norm(dim=1)`` reduces across the strided channel axis and took about 8x as long on CPU as
a square-and-sum for (2, 512, 64²) in torch 2.14, and 6x for (4, 512, 32²) forward (2.4x with
its backward). The square-and-sum reads each channel's row contiguously. float16 squares
overflow above 256, so half precision goes through ``vector_norm``, which accumulates in
float32.
"""

from __future__ import annotations

import torch
from torch import Tensor


def clamped_channel_norm(x: Tensor, eps: float) -> Tensor:
    """``max(|x|, eps)`` over dim 1 of (B, C, N): (B, N), with autograd.

    Value and gradient equal ``x.norm(dim=1).clamp_min(eps)``'s: the gradient is x / |x| where
    the norm reaches eps and 0 below it. The sum of squares is floored at the dtype's smallest
    normal number before the square root, so an all-zero pixel gets a finite derivative
    (multiplied by the 0 of the clamp) instead of 0 * inf = NaN.
    """
    if x.dtype == torch.float16:
        return torch.linalg.vector_norm(x, dim=1).clamp_min(eps)
    squares = (x * x).sum(1)
    return squares.clamp_min(torch.finfo(x.dtype).tiny).sqrt().clamp_min(eps)
