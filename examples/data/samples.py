"""The items a dataset yields, before and after the transforms, and their collate function.

Every dataset here (BUSI, images/+masks/ folders, the phantom) loads a :class:`RawSample`;
its transform turns it into a :class:`Sample` (training, or plain normalisation) or an
:class:`EvalSample` (evaluation, which also carries the mask at the original resolution so
that metrics are computed there).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = ["EvalSample", "RawSample", "Sample", "collate_samples"]

IGNORE_INDEX = 255
"""Mask value of pixels that take no part in the loss (crop padding)."""


class RawSample(NamedTuple):
    """One decoded image/mask pair, before any transform.

    Attributes:
        image: (3, H, W) uint8, a ``torchvision.tv_tensors.Image``; greyscale content
            replicated to three channels.
        mask: (H, W) uint8 in {0, 1}, a ``torchvision.tv_tensors.Mask``; 1 = lesion.
        id: the image path relative to the data directory, e.g. ``benign/benign (12).png``,
            or ``phantom/000123`` for the phantom.
    """

    image: Tensor
    mask: Tensor
    id: str


class Sample(NamedTuple):
    """A transformed item, as the network and the loss see it.

    Attributes:
        image: (3, H, W) float32, normalised with the ImageNet mean and std
            (:func:`examples.data.transforms.normalize`).
        mask: (H, W) int64 in {0, 1}, or 255 (:data:`IGNORE_INDEX`) where the crop padded.
        id: as in :class:`RawSample`.
    """

    image: Tensor
    mask: Tensor
    id: str


class EvalSample(NamedTuple):
    """An evaluation item: the network input plus the mask at the original resolution.

    Attributes:
        image: (3, h, w) float32, normalised and resized to the evaluation size.
        mask: (h, w) int64 in {0, 1}, the mask resized (nearest) with the image.
        id: as in :class:`RawSample`.
        full_mask: (H0, W0) int64 in {0, 1}, the mask at the original resolution; upsample
            the logits to ``full_mask.shape`` and score there.
    """

    image: Tensor
    mask: Tensor
    id: str
    full_mask: Tensor


def collate_samples(batch: Sequence[Sample | EvalSample]) -> Sample | EvalSample:
    """Stack a list of samples into one batch; use as ``DataLoader(collate_fn=...)``.

    ``image`` and ``mask`` are stacked to (B, 3, H, W) and (B, H, W), so they must share a
    size (crop or resize first). ``id`` becomes a list of strings. For :class:`EvalSample`,
    ``full_mask`` stays a list of (H0, W0) tensors, because original sizes differ.

    Example:
        >>> s = Sample(torch.zeros(3, 4, 4), torch.zeros(4, 4, dtype=torch.long), "a")
        >>> batch = collate_samples([s, s])
        >>> batch.image.shape, batch.id
        (torch.Size([2, 3, 4, 4]), ['a', 'a'])
    """
    if len(batch) == 0:
        raise ValueError("collate_samples needs at least one sample, got an empty batch")
    images = torch.stack([s.image for s in batch])
    masks = torch.stack([s.mask for s in batch])
    ids = [s.id for s in batch]
    first = batch[0]
    if isinstance(first, EvalSample):
        full = [s.full_mask for s in batch if isinstance(s, EvalSample)]
        if len(full) != len(batch):
            raise ValueError("collate_samples cannot mix Sample and EvalSample items in one batch")
        return EvalSample(images, masks, ids, full)  # type: ignore[arg-type]
    return Sample(images, masks, ids)  # type: ignore[arg-type]
