"""Pseudo-labels of the unlabeled images and their reliability (CSC-PA paper, Sec. 3.4-3.5).

Two rules decide which pseudo-labels count:

- the paper's: a pixel counts when its max softmax is at least tau = 0.8
  (:func:`pseudo_labels`, field ``valid``); one tau per class is our option;
- the one the authors ran, from U2PL: the ``keep_percent`` % lowest-entropy pixels of the whole
  batch count, with keep_percent rising from 80 to 100 over training
  (:func:`entropy_keep_mask` with :func:`keep_percent_schedule`).

The masking schedule of Sec. 3.4, :func:`keep_hard_schedule`, lives with the masking in
``confidence_mask.py``; it is re-exported here, where it used to be.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from cscpa_layers._checks import DECIMAL_TOLERANCE, check_epoch, check_floating, check_range, check_rank
from cscpa_layers.confidence_mask import keep_hard_schedule  # re-export: it lived here before

__all__ = [
    "PseudoLabels",
    "entropy_keep_mask",
    "keep_hard_schedule",
    "keep_percent_schedule",
    "pseudo_labels",
]


class PseudoLabels(NamedTuple):
    """Hard pseudo-labels with their confidence, returned by :func:`pseudo_labels`.

    Attributes:
        labels: (B, H, W) int64, the argmax class.
        confidence: (B, H, W) float, the max softmax probability, in [0, 1].
        valid: (B, H, W) bool, ``confidence >= threshold`` (of the pixel's class, when one
            threshold is given per class).
    """

    labels: Tensor
    confidence: Tensor
    valid: Tensor


def _check_logits(logits: Tensor) -> None:
    check_rank(logits, 4, "logits", "(B, K, H, W)")
    check_floating(logits, "logits")
    if logits.shape[1] < 1:
        raise ValueError(f"logits must have at least one class (K >= 1), got shape {tuple(logits.shape)}")


def pseudo_labels(logits: Tensor, *, threshold: float | Sequence[float] = 0.8) -> PseudoLabels:
    r"""Argmax pseudo-labels, their confidence and the paper's reliability rule.

    :math:`\hat y(p) = \arg\max_k P_k(p)`, :math:`c(p) = \max_k P_k(p)` with
    :math:`P = \mathrm{softmax}(\text{logits})`, valid where :math:`c(p) \ge \tau`. Computed
    without gradient: pseudo-labels are targets.

    With one threshold per class, :math:`\tau_k` for :math:`k = 0, \dots, K-1`, a pixel is valid
    where :math:`c(p) \ge \tau_{\hat y(p)}`: the threshold of the class it is labelled. That is
    our option, not the paper's (which has one tau); a lower threshold for a rare foreground
    class lets more of its pixels count without admitting more background.

    Args:
        logits: (B, K, H, W) float logits of f(x^u).
        threshold: tau in [0, 1], or a sequence of K such values, one per class.

    Returns:
        :class:`PseudoLabels` with ``labels`` (B, H, W) int64, ``confidence`` (B, H, W) in the
        dtype of ``logits``, and ``valid`` (B, H, W) bool, all detached.

    Example:
        >>> logits = torch.tensor([[[[4.0, 0.0]], [[0.0, 0.1]]]])  # (1, 2, 1, 2)
        >>> out = pseudo_labels(logits)
        >>> out.labels.tolist(), out.valid.tolist()
        ([[[0, 1]]], [[[True, False]]])
        >>> pseudo_labels(logits, threshold=(0.8, 0.5)).valid.tolist()  # class 1 at tau 0.5
        [[[True, True]]]
    """
    _check_logits(logits)
    taus = _checked_thresholds(threshold, logits.shape[1])
    with torch.no_grad():
        confidence, labels = logits.detach().softmax(1).max(1)  # each (B, H, W)
        if isinstance(taus, float):
            return PseudoLabels(labels, confidence, confidence >= taus)
        per_class = torch.tensor(taus, dtype=confidence.dtype, device=confidence.device)
        return PseudoLabels(labels, confidence, confidence >= per_class[labels])


def _checked_thresholds(threshold: float | Sequence[float], num_classes: int) -> float | list[float]:
    """Check ``threshold``: one float, or the list of K per-class values."""
    if isinstance(threshold, (int, float)) and not isinstance(threshold, bool):
        check_range(threshold, "threshold", 0.0, 1.0)
        return float(threshold)
    if isinstance(threshold, (str, bytes)) or not isinstance(threshold, Sequence):
        raise TypeError(f"threshold must be a number or a sequence of K numbers, got {type(threshold).__name__}")
    values = list(threshold)
    if len(values) != num_classes:
        raise ValueError(
            f"threshold must hold one value per class: expected K = {num_classes} values, got {len(values)}"
        )
    for k, value in enumerate(values):
        check_range(value, f"threshold[{k}]", 0.0, 1.0)
    return [float(v) for v in values]


def entropy_keep_mask(logits: Tensor, *, keep_percent: float) -> Tensor:
    r"""Keep the ``keep_percent`` % lowest-entropy pixels of the whole batch (U2PL's rule).

    With :math:`H(p) = -\sum_k P_k(p) \log P_k(p)` over all B·H·W pixels of the batch, the
    :math:`n = \lfloor q N + \tfrac{1}{2} \rfloor` pixels of lowest entropy are kept, with
    q = keep_percent / 100 and N = B·H·W (ties: the earlier pixel in memory order wins). So
    100 keeps every pixel and 0 none.

    The authors (after U2PL) drop the pixels at or above the keep_percent-th percentile of the
    entropy and multiply the mean loss over the kept pixels by N / n_kept:

    .. code-block:: python

        keep = entropy_keep_mask(logits_u, keep_percent=keep_percent_schedule(epoch, epochs))
        target = torch.where(keep, pseudo.labels, 255)
        loss_u = F.cross_entropy(logits_m, target, ignore_index=255)
        loss_u = loss_u * keep.numel() / keep.sum().clamp_min(1)   # N_all / N_kept

    Args:
        logits: (B, K, H, W) float logits of f(x^u).
        keep_percent: the share of pixels kept, in percent, in [0, 100].

    Returns:
        (B, H, W) bool, True where a pixel is kept; detached.

    Example:
        >>> logits = torch.tensor([[[[5.0, 0.0, 1.0, 3.0]], [[0.0, 0.0, 0.0, 0.0]]]])
        >>> entropy_keep_mask(logits, keep_percent=50).tolist()  # the 2 most confident of 4
        [[[True, False, False, True]]]
    """
    _check_logits(logits)
    check_range(keep_percent, "keep_percent", 0.0, 100.0)
    b, _, h, w = logits.shape
    total = b * h * w
    count = min(total, math.floor(keep_percent / 100 * total + 0.5 + DECIMAL_TOLERANCE))
    with torch.no_grad():
        log_probs = logits.detach().to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(1)
        entropy = -(log_probs.exp() * log_probs).sum(1)  # (B, H, W)
        order = torch.sort(entropy.flatten(), stable=True).indices
        keep = torch.zeros(total, dtype=torch.bool, device=logits.device)
        keep[order[:count]] = True
        return keep.view(b, h, w)


def keep_percent_schedule(epoch: float, epochs: int, *, start: float = 80.0, end: float = 100.0) -> float:
    r"""Share of pixels kept by :func:`entropy_keep_mask`, rising linearly from ``start`` to ``end``.

    :math:`\text{keep\_percent} = s + (e - s)\, t / T` (the authors: 80 -> 100).

    Args:
        epoch: t, the current epoch, in [0, T].
        epochs: T, the number of epochs.
        start: s, the percentage at t = 0, in [0, 100].
        end: e, the percentage at t = T, in [0, 100].

    Returns:
        The percentage of pixels to keep at epoch t.

    Example:
        >>> keep_percent_schedule(0, 200), keep_percent_schedule(100, 200), keep_percent_schedule(200, 200)
        (80.0, 90.0, 100.0)
    """
    check_epoch(epoch, epochs)
    check_range(start, "start", 0.0, 100.0)
    check_range(end, "end", 0.0, 100.0)
    return start + (end - start) * epoch / epochs
