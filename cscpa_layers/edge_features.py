"""Edge pixels of a label map and the edge features EPA learns from (CSC-PA §3.3).

An edge pixel is one whose 3 x 3 window holds more than one class. The candidates for the
adaptive edge container are the features at such pixels of a *prediction*, filtered by the
ground truth (correct labeled pixels) or by the confidence (reliable unlabeled pixels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from cscpa_layers._checks import (
    check_features,
    check_floating,
    check_generator,
    check_int,
    check_integer,
    check_positive_int,
    check_range,
    check_rank,
    check_same_device,
    check_shape,
    check_tensor,
    check_values_in,
    draw_device,
)

__all__ = ["edge_mask", "select_edge_features"]


def _check_labels(labels: Tensor, name: str) -> None:
    check_rank(labels, 3, name, "(B, H, W)")
    check_integer(labels, name)


def edge_mask(labels: Tensor, *, ignore_index: int = 255) -> Tensor:
    r"""Mark the pixels whose 3 x 3 neighbourhood holds more than one class.

    A pixel p is an edge pixel when the *valid* pixels of its window (p and its 8 neighbours)
    carry at least two different labels; for binary masks, both classes. Off-image neighbours
    and pixels equal to ``ignore_index`` take no part, so the image border alone never makes
    an edge and an ignored pixel is never an edge. Computed with two max-pools (window maximum
    and minimum of the valid labels), so it runs on the labels' device without Python loops.

    Args:
        labels: integer class labels of shape (B, H, W).
        ignore_index: the label that marks pixels to leave out.

    Returns:
        A bool tensor of shape (B, H, W), True at edge pixels.

    Example:
        >>> labels = torch.zeros(1, 5, 5, dtype=torch.long)
        >>> labels[0, 2, 2] = 1
        >>> edge_mask(labels).int()
        tensor([[[0, 0, 0, 0, 0],
                 [0, 1, 1, 1, 0],
                 [0, 1, 1, 1, 0],
                 [0, 1, 1, 1, 0],
                 [0, 0, 0, 0, 0]]], dtype=torch.int32)
        >>> edge_mask(torch.ones(1, 3, 3, dtype=torch.long)).any()  # one class: no edge
        tensor(False)
    """
    _check_labels(labels, "labels")
    check_int(ignore_index, "ignore_index")
    b, h, w = labels.shape
    if h == 0 or w == 0:  # a shape, not a value: fine under torch.compile
        return torch.zeros(b, h, w, dtype=torch.bool, device=labels.device)
    valid = labels != ignore_index  # (B, H, W)
    # Pooling needs floats; float64 holds every label below 2**53 exactly (MPS has no float64).
    dtype = torch.float32 if labels.device.type == "mps" else torch.float64
    values = labels.to(dtype).unsqueeze(1)  # (B, 1, H, W)
    inf = torch.tensor(float("inf"), dtype=dtype, device=labels.device)
    # max_pool2d pads with -inf, so off-image neighbours never win; ignored pixels are set to
    # -inf (for the maximum) or +inf (for the minimum, a max-pool of the negation) likewise.
    high = F.max_pool2d(torch.where(valid.unsqueeze(1), values, -inf), 3, stride=1, padding=1)
    low = -F.max_pool2d(torch.where(valid.unsqueeze(1), -values, -inf), 3, stride=1, padding=1)
    # A valid centre makes both extremes finite; two classes in the window make them differ.
    return valid & (high != low).squeeze(1)  # (B, H, W)


def select_edge_features(
    features: Tensor,
    prediction: Tensor,
    *,
    target: Tensor | None = None,
    confidence: Tensor | None = None,
    threshold: float = 0.8,
    num: int = 256,
    ignore_index: int = 255,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Draw up to ``num`` feature vectors at edge pixels of a prediction (candidates, E_h).

    A pixel is a candidate when it is an edge pixel of ``prediction`` (:func:`edge_mask`) and

    - with ``target``: the prediction is right there (``prediction == target``) and the target
      is not ``ignore_index``, the rule for labeled images;
    - with ``confidence``: ``confidence >= threshold``, the rule for unlabeled images (the
      paper's τ = 0.8);
    - with both: both conditions hold.

    If there are more than ``num`` candidates, ``num`` of them are drawn uniformly at random
    without replacement; otherwise all of them are returned, in random order. The rows are
    returned as they are, still in the autograd graph of ``features``;
    :meth:`AdaptiveEdgeContainer.update` detaches them.

    The number of rows depends on the data, so this function is not for
    ``torch.compile(fullgraph=True)``; it also synchronises a CUDA device (to count the
    candidates). Call it outside the compiled region.

    Args:
        features: features of shape (B, C, H, W).
        prediction: integer predicted labels of shape (B, H, W), at the feature resolution.
        target: integer ground truth of shape (B, H, W), or None.
        confidence: per-pixel confidence in [0, 1] of shape (B, H, W) (e.g. the max softmax
            probability), or None.
        threshold: the smallest confidence kept, in [0, 1].
        num: the most rows returned, a positive int.
        ignore_index: the label that marks pixels to leave out, in prediction and target.
        generator: the random generator of the draw, or None for the global one. The draw
            happens on the generator's device and the chosen indices move to the features.

    Returns:
        A tensor of shape (n, C) with ``n = min(num, #candidates)``, in the dtype of features.

    Example:
        >>> features = torch.randn(2, 8, 6, 6)
        >>> prediction = torch.zeros(2, 6, 6, dtype=torch.long)
        >>> prediction[:, 2:4, 2:4] = 1
        >>> rows = select_edge_features(features, prediction, target=prediction, num=10)
        >>> rows.shape
        torch.Size([10, 8])
        >>> select_edge_features(features, torch.zeros_like(prediction)).shape  # no edges
        torch.Size([0, 8])
    """
    check_features(features, "features")
    b, c, h, w = features.shape
    _check_labels(prediction, "prediction")
    check_shape(prediction, (b, h, w), "prediction", "(B, H, W) of features")
    check_same_device(features, prediction, "features", "prediction")
    check_range(threshold, "threshold", 0.0, 1.0)
    check_positive_int(num, "num")
    check_int(ignore_index, "ignore_index")
    check_generator(generator)

    mask = edge_mask(prediction, ignore_index=ignore_index)  # (B, H, W)
    if target is not None:
        _check_labels(target, "target")
        check_shape(target, (b, h, w), "target", "(B, H, W) of features")
        check_same_device(features, target, "features", "target")
        mask &= (prediction == target) & (target != ignore_index)
    if confidence is not None:
        check_tensor(confidence, "confidence")
        check_rank(confidence, 3, "confidence", "(B, H, W)")
        check_floating(confidence, "confidence")
        check_shape(confidence, (b, h, w), "confidence", "(B, H, W) of features")
        check_same_device(features, confidence, "features", "confidence")
        check_values_in(confidence, "confidence", 0.0, 1.0)  # NaN fails too
        mask &= confidence >= threshold

    flat = mask.flatten().nonzero().squeeze(1)  # (M,) indices into B*N, data-dependent M
    device = draw_device(generator, features.device)
    order = torch.randperm(flat.numel(), generator=generator, device=device)[:num]  # (n,)
    chosen = flat[order.to(flat.device)]  # (n,)
    image, pixel = chosen // (h * w), chosen % (h * w)
    return features.flatten(2)[image, :, pixel]  # (B, C, N) -> (n, C)
