"""Confidence-based masking of the unlabeled images (CSC-PA paper, Sec. 3.4).

The image is cut into square patches on a grid from the top-left (the last row and column of
patches are partial when the size is not a multiple of the patch size). A patch is a foreground
patch when it holds at least one predicted-foreground pixel, and its hardness is the mean
entropy of those pixels. The ⌈keep_hard · #foreground⌉ hardest foreground patches are kept;
of all the other patches, ⌈mask_ratio · #other⌉ are masked at random.

Everything is batched: patch statistics come from one reshape-and-sum over the padded map, the
hardest patches and the random ones from two sorts along the patch axis.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers._checks import (
    DECIMAL_TOLERANCE,
    check_epoch,
    check_floating,
    check_generator,
    check_positive_int,
    check_range,
    check_rank,
    check_same_device,
    check_tensor,
    check_values_in,
    draw_device,
)

__all__ = ["ConfidenceMasking", "MaskedImages", "confidence_mask", "keep_hard_schedule"]


class MaskedImages(NamedTuple):
    """The output of :class:`ConfidenceMasking`.

    Attributes:
        images: (B, C_img, H, W), the input images with the masked pixels set to ``fill``.
        mask: (B, 1, H, W) bool, True where a pixel was masked.
    """

    images: Tensor
    mask: Tensor


def ceil_count(count: Tensor, fraction: float) -> Tensor:
    """⌈fraction · count⌉ as int64, exact for fractions given in decimal (``DECIMAL_TOLERANCE``)."""
    return torch.ceil(count.double() * fraction - DECIMAL_TOLERANCE).clamp_min(0).long()


def _ranks(keys: Tensor, *, descending: bool) -> Tensor:
    """Rank of every entry along the last axis (0 = first), ties broken by position."""
    order = torch.sort(keys, dim=-1, descending=descending, stable=True).indices
    positions = torch.arange(keys.shape[-1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, positions)


def _patch_sums(x: Tensor, patch_size: int, rows: int, cols: int) -> Tensor:
    """(B, H, W) -> (B, rows * cols) sums over the patches; the padding of partial patches adds 0."""
    b, h, w = x.shape
    x = F.pad(x, (0, cols * patch_size - w, 0, rows * patch_size - h))
    return x.view(b, rows, patch_size, cols, patch_size).sum((2, 4)).flatten(1)


def _check_probs(probs: Tensor) -> None:
    check_rank(probs, 4, "probs", "(B, K, H, W)")
    check_floating(probs, "probs")
    if probs.shape[1] < 1:
        raise ValueError(f"probs must have at least one class (K >= 1), got shape {tuple(probs.shape)}")
    check_values_in(probs, "probs", 0.0, 1.0)


def confidence_mask(
    probs: Tensor,
    *,
    patch_size: int = 57,
    keep_hard: float = 0.7,
    mask_ratio: float = 0.7,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Patch mask that keeps the hardest foreground patches and drops a random share of the rest.

    With the entropy :math:`H(p) = -\sum_k P_k(p) \log P_k(p)` and the predicted foreground
    :math:`\mathcal{F} = \{p : \arg\max_k P_k(p) \neq 0\}`, a patch Q is a foreground patch when
    :math:`Q \cap \mathcal{F} \neq \emptyset`, with hardness :math:`\mathrm{mean}_{p \in Q \cap
    \mathcal{F}} H(p)`. The :math:`\lceil k \cdot n_{fg} \rceil` hardest foreground patches are
    kept (ties: the earlier patch in row-major order wins), and of the :math:`n_{rest}` others,
    :math:`\lceil r \cdot n_{rest} \rceil` are masked, chosen uniformly at random. Both counts
    round up, as the authors' code does.

    Args:
        probs: (B, K, H, W) softmax probabilities of f(x^u); class 0 is background.
        patch_size: side of the square patches, on a grid from the top-left; the last row and
            column are partial when H or W is not a multiple of it.
        keep_hard: k, the share of foreground patches kept as hard, in [0, 1].
        mask_ratio: r, the share of the other patches that is masked, in [0, 1].
        generator: random source, or None for the global one of ``probs``' device. The random
            numbers are drawn on the generator's device and moved to ``probs``, so the same
            seed gives the same mask on any device.

    Returns:
        (B, 1, H, W) bool mask on the device of ``probs``, True where masked.

    Example:
        >>> probs = torch.softmax(torch.randn(2, 2, 100, 80), dim=1)
        >>> mask = confidence_mask(probs, patch_size=20, generator=torch.Generator().manual_seed(0))
        >>> mask.shape, mask.dtype
        (torch.Size([2, 1, 100, 80]), torch.bool)
    """
    check_tensor(probs, "probs")
    _check_probs(probs)
    check_positive_int(patch_size, "patch_size")
    check_range(keep_hard, "keep_hard", 0.0, 1.0)
    check_range(mask_ratio, "mask_ratio", 0.0, 1.0)
    check_generator(generator)
    b, _, h, w = probs.shape
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    with torch.no_grad():
        # at least float32: bfloat16 cannot count the 3249 pixels of a 57 x 57 patch exactly
        probs = probs.detach().to(torch.promote_types(probs.dtype, torch.float32))
        # argmax != 0 without argmax (slow along a strided axis): some class beats class 0;
        # a tie goes to class 0, as argmax returns the first maximum
        if probs.shape[1] > 1:
            foreground = (probs[:, 1:].amax(1) > probs[:, 0]).to(probs.dtype)  # (B, H, W)
        else:  # background only
            foreground = probs.new_zeros(b, h, w)
        entropy = torch.xlogy(probs, probs).sum(1).neg_()  # H(p), 0 log 0 = 0, (B, H, W)
        fg_count = _patch_sums(foreground, patch_size, rows, cols)  # (B, P)
        fg_entropy = _patch_sums(entropy.mul_(foreground), patch_size, rows, cols)  # (B, P)
        is_foreground = fg_count > 0
        # background patches rank after every foreground patch (entropy >= 0 > -1)
        hardness = torch.where(is_foreground, fg_entropy / fg_count.clamp_min(1), -1.0)
        n_keep = ceil_count(is_foreground.sum(1), keep_hard)  # (B,), <= #foreground
        kept = _ranks(hardness, descending=True) < n_keep[:, None]  # (B, P)

        n_mask = ceil_count(rows * cols - n_keep, mask_ratio)  # (B,)
        device = draw_device(generator, probs.device)
        scores = torch.rand(b, rows * cols, generator=generator, device=device).to(probs.device)  # [0, 1)
        scores = torch.where(kept, 2.0, scores)  # kept patches sort last and are never chosen
        masked = _ranks(scores, descending=False) < n_mask[:, None]  # (B, P)

        mask = masked.view(b, rows, 1, cols, 1).expand(b, rows, patch_size, cols, patch_size)
        return mask.reshape(b, rows * patch_size, cols * patch_size)[:, None, :h, :w]  # (B, 1, H, W)


class ConfidenceMasking(nn.Module):
    r"""Confidence-based masking x^m of unlabeled images x^u; see :func:`confidence_mask`.

    Args:
        patch_size: side of the square patches (the paper: 57, a 9 x 9 grid on 513).
        keep_hard: share of foreground patches kept as hard; the paper schedules it as
            0.7 (1 - epoch / epochs), see :func:`keep_hard_schedule` and the ``keep_hard``
            argument of ``forward``.
        mask_ratio: share of the other patches that is masked.
        fill: value written into the masked pixels (0 is the mean in normalised space).

    Shape:
        - images: (B, C_img, H, W), float.
        - probs: (B, K, H, W) softmax probabilities of the same images, same B, H and W.
        - output: :class:`MaskedImages` with ``images`` (B, C_img, H, W) and ``mask``
          (B, 1, H, W) bool.

    Example:
        >>> masking = ConfidenceMasking(patch_size=16)
        >>> images = torch.randn(2, 3, 64, 64)
        >>> probs = torch.softmax(torch.randn(2, 2, 64, 64), dim=1)
        >>> out = masking(images, probs, keep_hard=0.5, generator=torch.Generator().manual_seed(0))
        >>> bool((out.images[out.mask.expand_as(images)] == 0).all())
        True
    """

    def __init__(
        self, *, patch_size: int = 57, keep_hard: float = 0.7, mask_ratio: float = 0.7, fill: float = 0.0
    ) -> None:
        super().__init__()
        check_positive_int(patch_size, "patch_size")
        check_range(keep_hard, "keep_hard", 0.0, 1.0)
        check_range(mask_ratio, "mask_ratio", 0.0, 1.0)
        if isinstance(fill, bool) or not isinstance(fill, (int, float)):
            raise TypeError(f"fill must be a number, got {type(fill).__name__}")
        self.patch_size = patch_size
        self.keep_hard = keep_hard
        self.mask_ratio = mask_ratio
        self.fill = float(fill)

    def forward(
        self,
        images: Tensor,
        probs: Tensor,
        *,
        keep_hard: float | None = None,
        generator: torch.Generator | None = None,
    ) -> MaskedImages:
        check_rank(images, 4, "images", "(B, C_img, H, W)")
        check_floating(images, "images")
        check_rank(probs, 4, "probs", "(B, K, H, W)")
        b, _, h, w = images.shape
        if (probs.shape[0], *probs.shape[2:]) != (b, h, w):
            raise ValueError(
                f"probs must have the batch size and spatial size of images, (B, H, W) = {(b, h, w)}, "
                f"got {(probs.shape[0], *probs.shape[2:])} from shape {tuple(probs.shape)}"
            )
        check_same_device(images, probs, "images", "probs")
        mask = confidence_mask(
            probs,
            patch_size=self.patch_size,
            keep_hard=self.keep_hard if keep_hard is None else keep_hard,
            mask_ratio=self.mask_ratio,
            generator=generator,
        )
        return MaskedImages(torch.where(mask, self.fill, images), mask)

    def extra_repr(self) -> str:
        return (
            f"patch_size={self.patch_size}, keep_hard={self.keep_hard}, "
            f"mask_ratio={self.mask_ratio}, fill={self.fill}"
        )


def keep_hard_schedule(epoch: float, epochs: int, *, start: float = 0.7) -> float:
    r"""Share of foreground patches kept by the masking: :math:`k = k_0 (1 - t / T)`.

    The paper's schedule of ``keep_hard`` (Sec. 3.4): hard patches are protected early in
    training and masked like the others by the end.

    Args:
        epoch: t, the current epoch (a float is fine for per-iteration schedules), in [0, T].
        epochs: T, the number of epochs.
        start: k_0, the share at t = 0, in [0, 1] (the paper: 0.7).

    Returns:
        k, falling linearly from ``start`` to 0.

    Example:
        >>> keep_hard_schedule(0, 200), keep_hard_schedule(100, 200), keep_hard_schedule(200, 200)
        (0.7, 0.35, 0.0)
    """
    check_epoch(epoch, epochs)
    check_range(start, "start", 0.0, 1.0)
    return start * (1 - epoch / epochs)
