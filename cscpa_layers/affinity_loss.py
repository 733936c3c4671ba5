"""Pixel affinity loss (PAL), CSC-PA paper Eqs. 12-14.

PAL makes the 8-neighbour affinity pattern of the predicted features agree with the pattern the
supervision implies. For a pixel p and its valid neighbours k (on the image, not ignored, and
confident enough):

    s_k(p)  = cos(F_p, F_{p+k})                                          Eq. 12
    N1(s)_k = s_k / max(sum_j |s_j|, eps)                                L1 over valid neighbours
    M_k(p)  = +1 if the label at p + k is foreground, -1 if background
    Ĝ(p)    = sum_k N1(s)_k M_k                                          Eq. 13, prediction side
    G(p)    = mean_k M_k                    (ground truth: equal weights)
            = sum_k N1(s')_k M_k            (pseudo-labels: s' from detached target features)
    L_pa    = mean_p KL(Bern(q(G)) || Bern(q(Ĝ))),  q(g) = (g + 1) / 2  Eq. 14

Memory: the features are never stacked into 8 shifted copies, nor normalised into a copy; see
``_neighbour_cosine.py``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from cscpa_layers._checks import (
    check_features,
    check_floating,
    check_int,
    check_integer,
    check_labels,
    check_option,
    check_range,
    check_same_device,
    check_shape,
    check_tensor,
    check_values_in,
)
from cscpa_layers._neighbour_cosine import OFFSETS, neighbour_cosine

__all__ = ["NEIGHBOUR_OFFSETS", "PixelAffinity", "PixelAffinityLoss", "pixel_affinity", "pixel_affinity_loss"]

REDUCTIONS = ("none", "mean", "sum")


class PixelAffinity(NamedTuple):
    """Affinities of every pixel with its 8 neighbours, returned by :func:`pixel_affinity`.

    The neighbour axis follows :data:`NEIGHBOUR_OFFSETS`, (dy, dx) in row-major order without
    the centre: slot k and slot 7 - k are opposite neighbours.

    Attributes:
        cosine: (B, 8, H, W) float, s_k(p) = cos(F_p, F_{p+k}); 0 where ``valid`` is False.
        weights: (B, 8, H, W) float, the L1-normalised affinities N1(s)_k; 0 where ``valid``
            is False. Their absolute values sum to 1 at every pixel with a non-zero cosine.
        valid: (B, 8, H, W) bool, True where the centre p and the neighbour p + k are both
            valid pixels and the neighbour is on the image.
    """

    cosine: Tensor
    weights: Tensor
    valid: Tensor


NEIGHBOUR_OFFSETS = OFFSETS


def _neighbour_maps(x: Tensor, fill: float | bool) -> Tensor:
    """Stack the 8 neighbours of a (B, H, W) map into (B, 8, H, W); off-image neighbours get ``fill``.

    For label-sized maps only (one channel), never for features.
    """
    b, h, w = x.shape
    padded = x.new_full((b, h + 2, w + 2), fill)
    padded[:, 1 : h + 1, 1 : w + 1] = x
    return torch.stack([padded[:, 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in OFFSETS], 1)


def _check_valid_map(valid: Tensor, features: Tensor) -> None:
    b, _, h, w = features.shape
    check_shape(valid, (b, h, w), "valid", "(B, H, W)")
    if valid.dtype != torch.bool:
        raise ValueError(f"valid must be a bool tensor, got dtype {valid.dtype}")
    check_same_device(features, valid, "features", "valid")


def _affinity(features: Tensor, valid: Tensor, eps: float) -> PixelAffinity:
    """:func:`pixel_affinity` without the input checks."""
    pair_valid = _neighbour_maps(valid, False) & valid.unsqueeze(1)  # (B, 8, H, W)
    cosine = torch.where(pair_valid, neighbour_cosine(features, eps), 0.0)  # (B, 8, H, W)
    # L1 over the valid neighbours; the authors divided by the signed sum, which can be 0
    norm = cosine.abs().sum(1, keepdim=True).clamp_min(eps)  # (B, 1, H, W)
    return PixelAffinity(cosine, cosine / norm, pair_valid)


def pixel_affinity(features: Tensor, valid: Tensor | None = None, *, eps: float = 1e-6) -> PixelAffinity:
    r"""L1-normalised cosine affinities of every pixel with its 8 neighbours (paper Eq. 12).

    :math:`s_k(p) = \cos(F_p, F_{p+k})` with the norms clamped at ``eps`` (all-zero features
    give 0, not NaN), and :math:`N_1(s)_k = s_k / \max(\sum_j |s_j|, \epsilon)` over the valid
    neighbours j. Invalid pixels take no part, as centre or as neighbour, and neither do
    off-image neighbours.

    Args:
        features: (B, C, H, W) float features.
        valid: (B, H, W) bool, the pixels that take part; ``None`` means all of them.
        eps: smallest norm in the cosine and smallest L1 norm in N1.

    Returns:
        :class:`PixelAffinity` with ``cosine``, ``weights`` and ``valid``, each (B, 8, H, W),
        in at least float32. The neighbour axis follows :data:`NEIGHBOUR_OFFSETS`.

    Example:
        >>> aff = pixel_affinity(torch.ones(1, 4, 3, 3))
        >>> aff.weights.shape
        torch.Size([1, 8, 3, 3])
        >>> aff.weights[0, :, 1, 1]  # the centre pixel: 8 equal neighbours
        tensor([0.1250, 0.1250, 0.1250, 0.1250, 0.1250, 0.1250, 0.1250, 0.1250])
        >>> int(aff.valid[0, :, 0, 0].sum())  # a corner has 3 neighbours on the image
        3
    """
    check_features(features, "features")
    check_range(eps, "eps", 0.0, 0.5, low_open=True)
    b, _, h, w = features.shape
    if valid is None:
        valid = torch.ones(b, h, w, dtype=torch.bool, device=features.device)
    _check_valid_map(valid, features)
    return _affinity(features, valid, eps)


def _bernoulli_kl(g_target: Tensor, g_pred: Tensor, eps: float) -> Tensor:
    """KL(Bern(q_t) || Bern(q_p)) with q = (g + 1) / 2 kept in [eps, 1 - eps] (paper Eq. 14)."""
    q_t = ((g_target + 1) / 2).clamp(eps, 1 - eps)
    q_p = ((g_pred + 1) / 2).clamp(eps, 1 - eps)
    return q_t * (q_t.log() - q_p.log()) + (1 - q_t) * (torch.log1p(-q_t) - torch.log1p(-q_p))


def _check_loss_inputs(
    features: Tensor,
    target: Tensor,
    confidence: Tensor | None,
    target_features: Tensor | None,
    threshold: float,
    ignore_index: int,
    reduction: str,
    eps: float,
) -> None:
    check_features(features, "features")
    b, _, h, w = features.shape
    check_tensor(target, "target")
    check_integer(target, "target")
    check_shape(target, (b, h, w), "target", "(B, H, W) of features")
    check_same_device(features, target, "features", "target")
    check_range(threshold, "threshold", 0.0, 1.0)
    check_int(ignore_index, "ignore_index")
    check_option(reduction, "reduction", REDUCTIONS)
    check_range(eps, "eps", 0.0, 0.5, low_open=True)
    check_labels(target, "target", ignore_index)
    if confidence is not None:
        check_tensor(confidence, "confidence")
        check_floating(confidence, "confidence")
        check_shape(confidence, (b, h, w), "confidence", "(B, H, W) of features")
        check_same_device(features, confidence, "features", "confidence")
        check_values_in(confidence, "confidence", 0.0, 1.0)
    if target_features is not None:
        check_features(target_features, "target_features")
        check_shape(target_features, features.shape, "target_features", "(B, C, H, W) of features")
        check_same_device(features, target_features, "features", "target_features")


def pixel_affinity_loss(
    features: Tensor,
    target: Tensor,
    *,
    confidence: Tensor | None = None,
    target_features: Tensor | None = None,
    threshold: float = 0.8,
    ignore_index: int = 255,
    reduction: str = "mean",
    eps: float = 1e-6,
) -> Tensor:
    r"""Pixel affinity loss: Bernoulli KL between target and predicted affinities (Eqs. 12-14).

    With :math:`M_k = +1` for a foreground neighbour (label > 0) and :math:`-1` for background
    (label 0), the prediction side is :math:`\hat G(p) = \sum_k N_1(s)_k M_k` with s the
    neighbour cosines of ``features`` (:func:`pixel_affinity`). The target side is

    - ground-truth form (``target_features=None``): :math:`G(p) = \mathrm{mean}_k M_k`, equal
      weights over the valid neighbours;
    - pseudo-label form: :math:`G(p) = \sum_k N_1(s')_k M_k` with s' the neighbour cosines of
      ``target_features``, which are detached.

    Both map to probabilities :math:`q = (G + 1)/2`, clamped to [eps, 1 - eps], and the loss
    at p is :math:`q_G \log(q_G / q_{\hat G}) + (1 - q_G) \log((1 - q_G) / (1 - q_{\hat G}))`.
    A pixel counts when it is valid (label not ``ignore_index``, confidence >= ``threshold``)
    and has at least one valid neighbour on the image. The gradient flows into ``features``
    only.

    Args:
        features: (B, C, H, W) float predicted features.
        target: (B, H, W) integer labels, ground truth or pseudo-labels: 0 is background,
            every other label but ``ignore_index`` is foreground.
        confidence: (B, H, W) float in [0, 1], or None; pixels below ``threshold`` take no
            part, as centre or as neighbour.
        target_features: (B, C, H, W) float, or None; given, the target uses their cosine
            weights (pseudo-label form).
        threshold: confidence threshold tau, in [0, 1].
        ignore_index: label of pixels that take no part.
        reduction: ``'mean'`` over the counted pixels, ``'sum'``, or ``'none'``.
        eps: clamp of q and smallest norm in the cosines and in N1, in (0, 0.5].

    Returns:
        A scalar for ``'mean'`` and ``'sum'``; the (B, H, W) per-pixel loss for ``'none'``,
        0 at pixels that do not count. The dtype is at least float32. With no counted pixel
        the result is exactly 0 and still attached to the graph of ``features``.

    Example:
        >>> target = torch.zeros(2, 6, 6, dtype=torch.long)
        >>> target[:, 2:5, 2:5] = 1
        >>> features = torch.randn(2, 8, 6, 6, requires_grad=True)
        >>> loss = pixel_affinity_loss(features, target)
        >>> loss.backward()
        >>> bool(loss > 0), features.grad.shape
        (True, torch.Size([2, 8, 6, 6]))
    """
    _check_loss_inputs(features, target, confidence, target_features, threshold, ignore_index, reduction, eps)
    valid = target != ignore_index  # (B, H, W)
    if confidence is not None:
        valid = valid & (confidence >= threshold)
    pred = _affinity(features, valid, eps)
    signs = torch.where(target > 0, 1.0, -1.0).to(pred.weights.dtype)  # M at every pixel, (B, H, W)
    neighbour_signs = _neighbour_maps(signs, 0.0)  # M_k(p), (B, 8, H, W)
    g_pred = (pred.weights * neighbour_signs).sum(1)  # Ĝ, Eq. 13, (B, H, W)
    count = pred.valid.sum(1)  # valid neighbours per pixel, (B, H, W)
    if target_features is None:
        # ground truth: "surrounding pixels contribute equally"
        g_target = (pred.valid * neighbour_signs).sum(1) / count.clamp_min(1)
    else:
        with torch.no_grad():
            weights = _affinity(target_features.detach(), valid, eps).weights
            g_target = (weights.to(neighbour_signs.dtype) * neighbour_signs).sum(1)
    counted = count > 0
    loss = torch.where(counted, _bernoulli_kl(g_target, g_pred, eps), 0.0)  # (B, H, W)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    # mean over the counted pixels; with none counted, 0 / 1 = 0, still in the graph
    return loss.sum() / counted.sum().clamp_min(1)


class PixelAffinityLoss(nn.Module):
    r"""Pixel affinity loss (PAL, paper Eqs. 12-14); see :func:`pixel_affinity_loss`.

    Args:
        threshold: pseudo-label confidence threshold tau; pixels below it take no part.
        ignore_index: label of pixels that take no part.
        reduction: ``'mean'`` over the counted pixels, ``'sum'``, or ``'none'``.
        eps: clamp of the probabilities and smallest norm in the cosines and in N1.

    Shape:
        - features: (B, C, H, W), float, receives the gradient.
        - target: (B, H, W), integer labels (ground truth or pseudo-labels).
        - confidence: (B, H, W) in [0, 1], optional.
        - target_features: (B, C, H, W), optional; gives the pseudo-label form. Detached.
        - output: scalar, or (B, H, W) for ``reduction='none'``.

    Example:
        >>> pal = PixelAffinityLoss()
        >>> features = torch.randn(2, 16, 9, 9, requires_grad=True)
        >>> labels = (torch.rand(2, 9, 9) > 0.5).long()
        >>> gt_loss = pal(features, labels)                        # labeled images
        >>> pl_loss = pal(features, labels, confidence=torch.rand(2, 9, 9),
        ...               target_features=torch.randn(2, 16, 9, 9))  # unlabeled images
        >>> (gt_loss + pl_loss).backward()
    """

    def __init__(
        self,
        *,
        threshold: float = 0.8,
        ignore_index: int = 255,
        reduction: str = "mean",
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_range(threshold, "threshold", 0.0, 1.0)
        check_int(ignore_index, "ignore_index")
        check_option(reduction, "reduction", REDUCTIONS)
        check_range(eps, "eps", 0.0, 0.5, low_open=True)
        self.threshold = threshold
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.eps = eps

    def forward(
        self,
        features: Tensor,
        target: Tensor,
        *,
        confidence: Tensor | None = None,
        target_features: Tensor | None = None,
    ) -> Tensor:
        return pixel_affinity_loss(
            features,
            target,
            confidence=confidence,
            target_features=target_features,
            threshold=self.threshold,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold}, ignore_index={self.ignore_index}, "
            f"reduction={self.reduction!r}, eps={self.eps}"
        )
