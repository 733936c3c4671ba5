"""Per-image Dice and IoU of binary lesion masks (method.md §8)."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class Scores(NamedTuple):
    dice: float
    iou: float


def dice_iou(prediction: Tensor, target: Tensor, *, ignore_index: int = 255) -> Scores:
    """Dice and IoU of the foreground of one image, (H, W) integer masks of the same shape.

    Pixels where ``target == ignore_index`` do not count. An empty prediction on an empty mask
    scores 1 for both (nothing to find, nothing found).
    """
    if prediction.shape != target.shape:
        raise ValueError(f"prediction and target must have the same shape, got {tuple(prediction.shape)} and {tuple(target.shape)}")
    valid = target != ignore_index
    pred = (prediction > 0) & valid
    true = (target > 0) & valid
    inter = (pred & true).sum().item()
    total = pred.sum().item() + true.sum().item()
    union = (pred | true).sum().item()
    if total == 0:
        return Scores(1.0, 1.0)
    return Scores(2.0 * inter / total, inter / union)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; (nan, nan) for an empty list."""
    if not values:
        return float("nan"), float("nan")
    data = torch.tensor(values, dtype=torch.float64)
    return data.mean().item(), data.std(unbiased=False).item()
