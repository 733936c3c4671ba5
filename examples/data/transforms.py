"""Joint image/mask transforms: weak augmentation for training, resizing for evaluation.

Image and mask travel together as ``torchvision.tv_tensors`` (``Image``, ``Mask``) through
``torchvision.transforms.v2``, so every geometric step moves both: images are resampled
bilinearly (antialiased when shrinking), masks by nearest neighbour.

The ImageNet normalisation lives here and only here (:data:`IMAGENET_MEAN`,
:data:`IMAGENET_STD`, :func:`normalize`, :func:`denormalize`). Images are normalised *before*
cropping, so the crop pads the image with 0 in normalised space (the channel mean), the same
fill value the confidence masking uses; the mask is padded with 255 (ignored).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from examples.data.samples import IGNORE_INDEX, EvalSample, RawSample, Sample

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "EvalTransform",
    "NormalizeTransform",
    "RandomScale",
    "TrainTransform",
    "denormalize",
    "normalize",
]

# The statistics the torchvision ImageNet weights were trained with.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_normalised() -> list[v2.Transform]:
    # uint8 -> float in [0, 1] for the image only; the mask keeps its integer dtype
    return [
        v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
        v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ]


def normalize(image: Tensor) -> Tensor:
    """Map a (3, H, W) or (B, 3, H, W) uint8 image to float32 normalised with ImageNet stats.

    Example:
        >>> x = normalize(torch.full((3, 2, 2), 255, dtype=torch.uint8))
        >>> [round(v, 3) for v in x[:, 0, 0].tolist()]
        [2.249, 2.429, 2.64]
    """
    if image.dtype != torch.uint8:
        raise ValueError(f"normalize expects a uint8 image, got dtype {image.dtype}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image.float() / 255 - mean) / std


def denormalize(image: Tensor) -> Tensor:
    """Inverse of :func:`normalize`: a normalised float image back to uint8 (for pictures).

    Example:
        >>> x = torch.randint(0, 256, (3, 4, 5), dtype=torch.uint8)
        >>> torch.equal(denormalize(normalize(x)), x)
        True
    """
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return ((image * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def _check_size(size: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair):
        raise ValueError(f"{name} must be a positive int or a pair (H, W) of positive ints, got {size!r}")
    return pair[0], pair[1]


class RandomScale(v2.Transform):
    """Resize image and mask together by one factor drawn uniformly from ``scale_range``.

    Unlike ``v2.ScaleJitter`` (relative to a target size) the factor multiplies the input's
    own size, which is what "random scale in [0.5, 2]" means (method.md section 6).

    Example:
        >>> img = tv_tensors.Image(torch.zeros(3, 10, 20))
        >>> msk = tv_tensors.Mask(torch.zeros(10, 20, dtype=torch.uint8))
        >>> out_img, out_msk = RandomScale((2.0, 2.0))(img, msk)
        >>> tuple(out_img.shape), tuple(out_msk.shape)
        ((3, 20, 40), (20, 40))
    """

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)) -> None:
        super().__init__()
        low, high = scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range!r}")
        self.scale_range = (float(low), float(high))

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        height, width = v2.query_size(flat_inputs)
        low, high = self.scale_range
        factor = low + (high - low) * torch.rand(()).item()
        return {"size": [max(1, round(height * factor)), max(1, round(width * factor))]}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return self._call_kernel(v2.functional.resize, inpt, size=params["size"], antialias=True)


class TrainTransform:
    """Weak augmentation of method.md section 6: scale, flip, crop; returns a :class:`Sample`.

    Steps: normalise; optionally resize to ``base_size`` x ``base_size`` (the same square size
    :class:`EvalTransform` gives, so training and evaluation see one scale); scale by a factor
    in ``scale_range``; flip horizontally with
    probability ``flip``; take a random ``crop`` x ``crop`` window, padding the image with 0
    (normalised mean) and the mask with 255 (ignored) where the scaled image is smaller.
    Randomness comes from torch's global generator (seeded per DataLoader worker).

    Args:
        crop: side of the square crop, or a pair (H, W); the trainer passes ``TrainConfig.crop``.
        scale_range: (low, high) range of the random scale factor.
        flip: probability of a horizontal flip.
        base_size: if given, images are first resized to this square side (CPU-sized runs
            use it to shrink large images before the paper's scale range applies).

    Example:
        >>> raw = RawSample(tv_tensors.Image(torch.zeros(3, 40, 50, dtype=torch.uint8)),
        ...                 tv_tensors.Mask(torch.ones(40, 50, dtype=torch.uint8)), "x")
        >>> s = TrainTransform(crop=64)(raw)
        >>> tuple(s.image.shape), s.mask.dtype, sorted(s.mask.unique().tolist())[-1] in (1, 255)
        ((3, 64, 64), torch.int64, True)
    """

    def __init__(self, crop: int | Sequence[int], *, scale_range: tuple[float, float] = (0.5, 2.0),
                 flip: float = 0.5, base_size: int | None = None) -> None:
        self.crop = _check_size(crop, "crop")
        self.base_size = None if base_size is None else _check_size(base_size, "base_size")
        if not 0.0 <= flip <= 1.0:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip}")
        self.scale_range = scale_range
        self.flip = flip
        base = [] if self.base_size is None else [v2.Resize(list(self.base_size), antialias=True)]
        self.pipeline = v2.Compose([
            *_to_normalised(),
            *base,
            RandomScale(scale_range),
            v2.RandomHorizontalFlip(flip),
            v2.RandomCrop(self.crop, pad_if_needed=True,
                          fill={tv_tensors.Image: 0.0, tv_tensors.Mask: IGNORE_INDEX}),
        ])

    def __call__(self, raw: RawSample) -> Sample:
        image, mask = self.pipeline(raw.image, raw.mask)
        return Sample(image.as_subclass(Tensor), mask.as_subclass(Tensor).long(), raw.id)

    def __repr__(self) -> str:
        return (f"TrainTransform(crop={self.crop}, scale_range={self.scale_range}, flip={self.flip}, "
                f"base_size={self.base_size})")


class EvalTransform:
    """Normalise and resize to a fixed network input size; returns an :class:`EvalSample`.

    The network sees a ``size`` image; ``full_mask`` keeps the original-resolution mask so
    that Dice and IoU are computed at the original size (method.md section 8), after
    upsampling the logits to ``full_mask.shape``.

    Args:
        size: network input side (square), a pair (H, W), or None to keep the original size.

    Example:
        >>> raw = RawSample(tv_tensors.Image(torch.zeros(3, 40, 50, dtype=torch.uint8)),
        ...                 tv_tensors.Mask(torch.ones(40, 50, dtype=torch.uint8)), "x")
        >>> s = EvalTransform(32)(raw)
        >>> tuple(s.image.shape), tuple(s.mask.shape), tuple(s.full_mask.shape)
        ((3, 32, 32), (32, 32), (40, 50))
    """

    def __init__(self, size: int | Sequence[int] | None) -> None:
        self.size = None if size is None else _check_size(size, "size")
        steps = _to_normalised()
        if self.size is not None:
            steps.append(v2.Resize(list(self.size), antialias=True))
        self.pipeline = v2.Compose(steps)

    def __call__(self, raw: RawSample) -> EvalSample:
        image, mask = self.pipeline(raw.image, raw.mask)
        full = raw.mask.as_subclass(Tensor).long()
        return EvalSample(image.as_subclass(Tensor), mask.as_subclass(Tensor).long(), raw.id, full)

    def __repr__(self) -> str:
        return f"EvalTransform(size={self.size})"


class NormalizeTransform:
    """Only normalise, keeping the original size; returns a :class:`Sample` (the default).

    Example:
        >>> raw = RawSample(tv_tensors.Image(torch.zeros(3, 4, 5, dtype=torch.uint8)),
        ...                 tv_tensors.Mask(torch.ones(4, 5, dtype=torch.uint8)), "x")
        >>> s = NormalizeTransform()(raw)
        >>> s.image.dtype, tuple(s.mask.shape)
        (torch.float32, (4, 5))
    """

    def __call__(self, raw: RawSample) -> Sample:
        image = normalize(raw.image.as_subclass(Tensor))
        return Sample(image, raw.mask.as_subclass(Tensor).long(), raw.id)

    def __repr__(self) -> str:
        return "NormalizeTransform()"
