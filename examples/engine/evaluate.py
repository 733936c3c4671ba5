"""Evaluation at the original resolution, and overlay pictures of prediction against truth."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from examples.engine.metrics import dice_iou, mean_std
from examples.data.transforms import denormalize


class ImageScore(NamedTuple):
    id: str
    dice: float
    iou: float


class Evaluation(NamedTuple):
    """Per-image scores and their mean and standard deviation over images."""

    scores: list[ImageScore]
    dice: float
    dice_std: float
    iou: float
    iou_std: float


@torch.no_grad()
def predict_full(model: nn.Module, image: Tensor, size: tuple[int, int]) -> Tensor:
    """Class map (H0, W0) of one normalised (3, h, w) image, upsampled to the original size."""
    logits = model(image[None]).logits.float()  # (1, K, h, w)
    logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(1)[0]


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    device: torch.device,
    *,
    autocast: Any = None,
    overlays: int = 0,
    overlay_dir: Path | None = None,
) -> Evaluation:
    """Dice and IoU per image at the original resolution (method.md §8).

    ``dataset`` yields `EvalSample` items. The model runs in eval mode, so FPA pairs each image
    with itself or passes it through, as its ``eval_pairing`` says, and EPA uses its stored
    edge bank. The first ``overlays`` images are also written as PNG overlays.
    """
    was_training = model.training
    model.eval()
    scores = []
    try:
        for index in range(len(dataset)):
            sample = dataset[index]
            full_mask = sample.full_mask
            image = sample.image.to(device)
            if autocast is not None:
                with autocast():
                    prediction = predict_full(model, image, tuple(full_mask.shape)).cpu()
            else:
                prediction = predict_full(model, image, tuple(full_mask.shape)).cpu()
            dice, iou = dice_iou(prediction, full_mask)
            scores.append(ImageScore(sample.id, dice, iou))
            if overlay_dir is not None and index < overlays:
                write_overlay(sample.image, prediction, full_mask, overlay_dir / overlay_name(sample.id))
    finally:
        model.train(was_training)
    dice_mean, dice_std = mean_std([s.dice for s in scores])
    iou_mean, iou_std = mean_std([s.iou for s in scores])
    return Evaluation(scores, dice_mean, dice_std, iou_mean, iou_std)


def overlay_name(item_id: str) -> str:
    """File name of an image's overlay: its id with the image suffix dropped and every
    character other than letters, digits, ``-``, ``_`` and ``.`` replaced by ``_``
    (``"benign/benign (11).png"`` -> ``"benign_benign__11_.png"``)."""
    stem = item_id.rsplit(".", 1)[0] if "." in item_id.rsplit("/", 1)[-1] else item_id
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem) + ".png"


def overlay_picture(image: np.ndarray, prediction: np.ndarray, truth: np.ndarray | None) -> np.ndarray:
    """RGB uint8 picture: the image in grey, the prediction tinted red, the truth outlined
    green (when given)."""
    grey = image.astype(np.float32)
    out = grey.copy()
    pred = prediction > 0
    out[pred] = 0.55 * grey[pred] + 0.45 * np.array([255.0, 40.0, 40.0])
    if truth is not None:
        edge = truth > 0
        inner = np.zeros_like(edge)
        inner[1:-1, 1:-1] = edge[1:-1, 1:-1] & edge[:-2, 1:-1] & edge[2:, 1:-1] & edge[1:-1, :-2] & edge[1:-1, 2:]
        out[edge & ~inner] = np.array([40.0, 255.0, 40.0])
    return out.clip(0, 255).astype(np.uint8)


def write_overlay(image: Tensor, prediction: Tensor, truth: Tensor | None, path: Path) -> None:
    """Save `overlay_picture` of a normalised (3, h, w) image at the prediction's size."""
    size = tuple(prediction.shape)
    pixels = denormalize(image.detach().cpu().float())  # (3, h, w) in [0, 1]
    pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False)[0]
    rgb = (pixels.permute(1, 2, 0).clamp(0, 1) * 255).numpy()
    truth_np = None if truth is None else truth.cpu().numpy()
    picture = overlay_picture(rgb, prediction.cpu().numpy(), truth_np)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(picture).save(path)
