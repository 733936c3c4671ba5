"""Cosine similarity of every pixel with its 8 neighbours, with a hand-written backward.

For features F of shape (B, C, H, W) and the neighbour offsets k of ``OFFSETS``:

    s_k(p) = <F_p, F_{p+k}> / (R_p R_{p+k}),    R_p = max(|F_p|, eps)

which is ``cos`` on the once-normalised features, exactly as ``F.normalize`` clamps the norm.

Memory. Autograd over ``normalize(F)`` and 8 shifted products would keep the normalised copy
and a product per neighbour. Here nothing of feature-map size is created besides the gradient
itself:

- s_k(p) = s_{-k}(p + k), so only the 4 offsets of the first half of ``OFFSETS`` are computed;
  the opposite slot is the same numbers written one pixel over.
- The dot products read shifted slices (views) of F itself; F is never normalised into a copy,
  the norms R are divided out of the (B, H, W) results instead.
- The work runs over chunks of (images, channels) small enough to stay in the CPU cache, so each
  chunk is read from memory once for all 4 offsets (and the products' temporaries are small).
- Backward saves only F (the caller's tensor), the norms and the (B, 8, H, W) cosines. With
  a_k(p) the gradient of the pair (p, p+k), from both slots that hold it:

      dF_p    += a_k(p) F_{p+k} / (R_p R_{p+k})                for each pair touching p
      dF_p    -= F_p * sum_pairs(a * s) / R_p^2                 where |F_p| >= eps

  accumulated in place into the gradient buffer, chunk by chunk.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from cscpa_layers._checks import without_autocast

# Row-major 3x3 neighbourhood without the centre: slot k and slot 7 - k are opposite offsets.
OFFSETS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
_HALF = 4  # offsets 0..3; offset 7 - k is the negative of offset k

# Elements per chunk on CPU: 2**21 floats = 8 MiB, so a chunk and its temporaries stay in the
# last-level cache while all 4 offsets read it. Measured at B=8, C=512, 64x64 on 2 cores:
# 2**16-2**21 run within noise of each other when the machine is quiet, whole-batch products
# are 3x slower; on a busy machine fewer, larger chunks suffer less (every op is a parallel
# region that waits for a descheduled thread), hence the top of that range.
_CPU_CHUNK = 2**21
# Elements per chunk elsewhere (CUDA): large enough that kernel launches do not dominate, small
# enough that the products' temporaries stay a fraction of the feature map.
_DEVICE_CHUNK = 2**24


def overlap(dy: int, dx: int, h: int, w: int) -> tuple[tuple[slice, slice], tuple[slice, slice]]:
    """(rows, cols) slices of the pixels p whose neighbour p + (dy, dx) is on the image.

    Returns the slices of those pixels and the slices of their neighbours.
    """
    r0, c0 = max(0, -dy), max(0, -dx)
    r1, c1 = max(r0, h - max(0, dy)), max(c0, w - max(0, dx))
    return (slice(r0, r1), slice(c0, c1)), (slice(r0 + dy, r1 + dy), slice(c0 + dx, c1 + dx))


def _chunks(x: Tensor) -> list[tuple[slice, slice]]:
    """(batch, channel) slices that tile x; one slice each under torch.compile (inductor fuses)."""
    b, c, h, w = x.shape
    n = h * w
    if x.numel() == 0:
        return []
    if torch.compiler.is_compiling():
        return [(slice(None), slice(None))]
    if x.device.type != "cpu":
        step = max(1, _DEVICE_CHUNK // (b * n))
        return [(slice(None), slice(c0, c0 + step)) for c0 in range(0, c, step)]
    if c * n <= _CPU_CHUNK:  # several whole images per chunk
        step = max(1, _CPU_CHUNK // (c * n))
        return [(slice(b0, b0 + step), slice(None)) for b0 in range(0, b, step)]
    step = max(1, _CPU_CHUNK // n)
    return [(slice(i, i + 1), slice(c0, c0 + step)) for i in range(b) for c0 in range(0, c, step)]


class NeighbourCosine(torch.autograd.Function):
    """``x (B, C, H, W) -> (B, 8, H, W)`` cosines with the neighbours of ``OFFSETS`` (0 off the image)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        b, _, h, w = x.shape
        regions = [overlap(dy, dx, h, w) for dy, dx in OFFSETS[:_HALF]]
        squares = x.new_zeros(b, h, w)  # |F_p|^2, (B, H, W)
        dots = [x.new_zeros(b, p[0].stop - p[0].start, p[1].stop - p[1].start) for p, _ in regions]
        for bs, cs in _chunks(x):
            chunk = x[bs, cs]  # (b', c', H, W), a view
            squares[bs] += chunk.square().sum(1)
            for dot, (p, q) in zip(dots, regions):
                # <F_p, F_{p+k}> from two shifted views of the same chunk, (b', h', w')
                dot[bs] += (chunk[:, :, p[0], p[1]] * chunk[:, :, q[0], q[1]]).sum(1)
        norm = squares.sqrt()  # (B, H, W)
        scale = norm.clamp_min(eps)
        out = x.new_zeros(b, 2 * _HALF, h, w)
        for k, (dot, (p, q)) in enumerate(zip(dots, regions)):
            # divide one norm at a time: R_p * R_q could overflow where their quotient does not
            cos = dot / scale[:, p[0], p[1]] / scale[:, q[0], q[1]]
            out[:, k, p[0], p[1]] = cos  # s_k(p)
            out[:, 2 * _HALF - 1 - k, q[0], q[1]] = cos  # s_{-k}(p + k), the same pair
        ctx.eps = eps
        ctx.device_type = x.device.type
        ctx.save_for_backward(x, norm, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None]:
        with without_autocast(ctx.device_type):
            return NeighbourCosine._backward(ctx, grad_out), None

    @staticmethod
    def _backward(ctx: Any, grad_out: Tensor) -> Tensor:
        x, norm, out = ctx.saved_tensors
        eps = ctx.eps
        b, _, h, w = x.shape
        scale = norm.clamp_min(eps)  # (B, H, W)
        regions = [overlap(dy, dx, h, w) for dy, dx in OFFSETS[:_HALF]]
        pair_weights = []  # a_k / (R_p R_{p+k}) per offset, (B, h', w')
        radial = torch.zeros_like(norm)  # sum over the pairs touching p of a * s, (B, H, W)
        for k, (p, q) in enumerate(regions):
            # both slots holding the pair (p, p + k) feed its gradient
            pair = grad_out[:, k, p[0], p[1]] + grad_out[:, 2 * _HALF - 1 - k, q[0], q[1]]
            pair_weights.append(pair / scale[:, p[0], p[1]] / scale[:, q[0], q[1]])
            along = pair * out[:, k, p[0], p[1]]
            radial[:, p[0], p[1]] += along
            radial[:, q[0], q[1]] += along
        # d R_p / d F_p = F_p / |F_p| only where the norm is not clamped (as in F.normalize)
        radial = torch.where(norm >= eps, radial / scale.square(), 0.0).neg_()
        grad = torch.empty_like(x)
        for bs, cs in _chunks(x):
            chunk = x[bs, cs]
            acc = grad[bs, cs]  # written in place, (b', c', H, W)
            acc.copy_(chunk).mul_(radial[bs].unsqueeze(1))
            for weight, (p, q) in zip(pair_weights, regions):
                weight = weight[bs].unsqueeze(1)  # (b', 1, h', w'), broadcast over channels
                acc[:, :, p[0], p[1]].addcmul_(chunk[:, :, q[0], q[1]], weight)
                acc[:, :, q[0], q[1]].addcmul_(chunk[:, :, p[0], p[1]], weight)
        return grad


def neighbour_cosine(x: Tensor, eps: float) -> Tensor:
    """(B, 8, H, W) cosines of x (B, C, H, W) with its neighbours; computed in at least float32."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with without_autocast(x.device.type):
        out: Tensor = NeighbourCosine.apply(x.to(dtype), eps)
    return out
