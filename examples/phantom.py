"""A synthetic breast-ultrasound phantom: the built-in dataset that needs no files.

Each image is generated on the fly from (seed, index), in a few milliseconds, as a B-mode
image is formed:

1. **Tissue echogenicity** E(y, x) (y is depth): skin line, subcutaneous fat (dark, lobulated),
   fibroglandular tissue (bright, horizontally fibrous), deep fat and muscle, separated by wavy
   boundaries and textured with smooth random fields.
2. **Lesions**: 0 to 3 hypoechoic masses (probabilities :data:`LESION_COUNT_PROBS`). Each is a
   polar shape r(θ) = r0·(1 + Σ_m a_m cos(mθ + φ_m)) with low harmonics (lobulation) and,
   for some, high ones (spiculation), an aspect ratio, a rotation and a radius r0 drawn
   log-uniformly between 3% and 22% of the image side. Margins are blurred by a sigmoid of
   width 0.5-4 px. Inside, E drops to 5-40% of the tissue.
3. **Posterior acoustic effect** below each lesion: a shadow (E x 0.35-0.7) or an enhancement
   (E x 1.3-1.8) over the lesion's width, fading with depth.
4. **Depth attenuation** exp(-α·y).
5. **Speckle**: the envelope is E times a Rayleigh-distributed field, the magnitude of a
   complex Gaussian field filtered by an anisotropic point-spread function (grains longer
   laterally than axially), scaled to mean 1.
6. **Log compression** to 8 bits over a 40 dB dynamic range.

The mask is the union of the lesion shapes (the pixels inside r(θ)).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision import tv_tensors

from examples.dataset_base import SegmentationDataset, Transform
from examples.samples import RawSample
from examples.transforms import NormalizeTransform

__all__ = ["LESION_COUNT_PROBS", "PhantomDataset", "PhantomImage", "count_lesions", "phantom_seed", "rayleigh_speckle", "render_phantom"]

LESION_COUNT_PROBS = (0.2, 0.45, 0.25, 0.1)
"""Probability of 0, 1, 2 and 3 lesions in an image."""
DYNAMIC_RANGE_DB = 40.0
_ANGLES = 360  # resolution of the r(θ) lookup table
_TEXTURE_SALT = 0x5DEECE66D  # derives the texture generator's seed from the layout's


class PhantomImage(NamedTuple):
    """One rendered phantom.

    Attributes:
        image: (H, W) uint8, the log-compressed B-mode image.
        mask: (H, W) bool, the union of the lesions.
        num_lesions: how many lesions were placed (0-3).
        echogenicity: (H, W) float32, the noise-free tissue map E before speckle (for tests
            and pictures).
    """

    image: Tensor
    mask: Tensor
    num_lesions: int
    echogenicity: Tensor


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _smooth_field(g: torch.Generator, size: int, coarse: tuple[int, int]) -> Tensor:
    """Zero-mean, unit-ish smooth random field: coarse Gaussian noise upsampled bicubically."""
    noise = torch.randn(1, 1, *coarse, generator=g)
    return F.interpolate(noise, size=(size, size), mode="bicubic", align_corners=False)[0, 0]  # (S, S)


def _gaussian_kernel(sigma: float) -> Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: Tensor, kernel: Tensor, dim: int) -> Tensor:
    """Circular convolution of ``x`` with a symmetric 1-D kernel along ``dim``.

    A sum of rolled copies: for single-channel maps this is ~10x faster than ``conv2d``.
    """
    radius = len(kernel) // 2
    out = kernel[radius] * x
    for j in range(1, radius + 1):
        out = out + kernel[radius + j] * (x.roll(j, dim) + x.roll(-j, dim))
    return out


def rayleigh_speckle(size: int, g: torch.Generator, *, axial_sigma: float = 0.6,
                     lateral_sigma: float = 1.3) -> Tensor:
    """Multiplicative speckle of mean 1: |h * (n1 + i n2)| with a separable Gaussian PSF h.

    A sum of many random phasors has a complex Gaussian amplitude, whose magnitude is
    Rayleigh distributed (std / mean = sqrt(4/π - 1) ≈ 0.523). Filtering the two Gaussian
    fields by the same PSF keeps them Gaussian with variance Σh², so the mean of the
    magnitude is known exactly: sqrt(Σh²)·sqrt(π/2).

    Returns:
        (size, size) float32 field, mean 1.
    """
    noise = torch.randn(2, size, size, generator=g)  # real and imaginary parts
    ky, kx = _gaussian_kernel(axial_sigma), _gaussian_kernel(lateral_sigma)
    blurred = _blur(_blur(noise, ky, dim=1), kx, dim=2)  # (2, S, S)
    sigma = math.sqrt(float((ky**2).sum() * (kx**2).sum()))
    magnitude = torch.sqrt(blurred[0] ** 2 + blurred[1] ** 2)  # (S, S)
    return magnitude / (sigma * math.sqrt(math.pi / 2))


def _tissue(g: torch.Generator, size: int, yy: Tensor) -> Tensor:
    """Layered echogenicity: skin, fat, fibroglandular tissue, deep fat / muscle."""
    x = torch.linspace(0, 1, size)

    def boundary(depth: float, wobble: float) -> Tensor:  # (1, S): a wavy horizontal interface
        wave = F.interpolate(torch.randn(1, 1, 6, generator=g), size=size, mode="linear", align_corners=True)[0]
        return depth + wobble * wave + 0.02 * torch.sin(2 * math.pi * (x * _uniform(g, 0.5, 2) + _uniform(g, 0, 1)))

    skin = _uniform(g, 0.03, 0.07)
    fat_end = boundary(_uniform(g, 0.18, 0.35), 0.03)
    gland_end = boundary(_uniform(g, 0.6, 0.85), 0.05)
    width = 0.015 * size

    def step(edge: Tensor | float) -> Tensor:
        return torch.sigmoid((yy - edge * size) / width)

    fat, gland, deep = _uniform(g, 0.3, 0.5), _uniform(g, 0.7, 1.0), _uniform(g, 0.35, 0.6)
    levels = fat + (gland - fat) * step(fat_end) + (deep - gland) * step(gland_end)
    levels = levels + 0.8 * torch.exp(-(((yy / size) - skin) / 0.012) ** 2)  # bright skin line
    fibres = _smooth_field(g, size, (max(4, size // 6), max(2, size // 40)))  # horizontally long streaks
    lobules = _smooth_field(g, size, (max(2, size // 24), max(2, size // 24)))
    texture = 1 + 0.25 * fibres * step(fat_end) + 0.3 * lobules * (1 - step(fat_end))
    return (levels * texture).clamp_min(0.05)


class _Lesion(NamedTuple):
    cy: float
    cx: float
    r0: float
    aspect: float  # height / width
    angle: float
    radius: Tensor  # (_ANGLES,) r(θ)
    blur: float  # margin width in pixels
    level: float  # echogenicity inside, as a fraction of the tissue's
    posterior: float  # < 0: shadow, > 0: enhancement


def _radius_table(g: torch.Generator, r0: float) -> Tensor:
    """r(θ) on a table of angles: lobulated (m = 2..6) and sometimes spiculated (m = 10..24)."""
    theta = torch.linspace(0, 2 * math.pi, _ANGLES + 1)[:-1]
    irregular = _uniform(g, 0.0, 0.3)
    r = torch.ones(_ANGLES)
    for m in range(2, 7):
        r += _uniform(g, 0, irregular / m) * torch.cos(m * theta + _uniform(g, 0, 2 * math.pi))
    if _uniform(g, 0, 1) < 0.3:
        for m in range(10, 25, 2):
            r += _uniform(g, 0, 0.04) * torch.cos(m * theta + _uniform(g, 0, 2 * math.pi))
    return r0 * r.clamp_min(0.3)


def _layout(g: torch.Generator, size: int) -> list[_Lesion]:
    """Draw the lesions: a count, then non-overlapping placements (a lesion that finds no
    free spot in 10 tries is dropped) and their shapes. Uses its own generator, so the count
    is known without rendering."""
    count = int(torch.multinomial(torch.tensor(LESION_COUNT_PROBS), 1, generator=g))
    lesions: list[_Lesion] = []
    for _ in range(count):
        for _ in range(10):
            r0 = size * math.exp(_uniform(g, math.log(0.03), math.log(0.22)))
            cy, cx = _uniform(g, 0.22, 0.7) * size, _uniform(g, 0.12, 0.88) * size
            if all(math.hypot(cy - o.cy, cx - o.cx) > 1.3 * (r0 + o.r0) for o in lesions):
                break
        else:
            continue
        shadow = _uniform(g, 0, 1) < 0.5
        lesions.append(_Lesion(
            cy, cx, r0,
            aspect=_uniform(g, 0.55, 1.3),  # wider-than-tall (benign-like) to taller-than-wide
            angle=_uniform(g, -0.35, 0.35),
            radius=_radius_table(g, r0),
            blur=_uniform(g, 0.5, 4.0),  # circumscribed to indistinct margins
            level=_uniform(g, 0.05, 0.4),  # anechoic cyst to hypoechoic solid mass
            posterior=_uniform(g, -0.65, -0.3) if shadow else _uniform(g, 0.3, 0.8),
        ))
    return lesions


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch ops single-threaded. The maps are small (65k pixels at 256²), so intra-op
    threads only add synchronisation, and with the second core busy an OpenMP barrier
    turned a 6 ms render into 760 ms (measured on the 2-core CI machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def render_phantom(seed: int, *, size: int = 256, speckle: bool = True) -> PhantomImage:
    """Render one phantom image from an integer seed; see the module docstring for the model.

    Args:
        seed: any int in [0, 2**63); the same seed always gives the same image.
        size: side of the square image in pixels (>= 32).
        speckle: multiply by the Rayleigh speckle field (False gives the smooth envelope).

    Returns:
        A :class:`PhantomImage`.

    Example:
        >>> p = render_phantom(0, size=64)
        >>> p.image.shape, p.image.dtype, p.mask.dtype, 0 <= p.num_lesions <= 3
        (torch.Size([64, 64]), torch.uint8, torch.bool, True)
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    with _one_thread():
        return _render(seed, size, speckle)


def _render(seed: int, size: int, speckle: bool) -> PhantomImage:
    lesions = _layout(torch.Generator().manual_seed(seed), size)
    g = torch.Generator().manual_seed(seed ^ _TEXTURE_SALT)  # textures and speckle
    yy, xx = torch.meshgrid(torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32),
                            indexing="ij")
    echo = _tissue(g, size, yy)  # (S, S)
    mask = torch.zeros(size, size, dtype=torch.bool)
    posterior = torch.ones(size, size)
    for lesion in lesions:
        dy, dx = yy - lesion.cy, xx - lesion.cx
        cos, sin, stretch = math.cos(lesion.angle), math.sin(lesion.angle), math.sqrt(lesion.aspect)
        u = (dx * cos + dy * sin) * stretch  # lesion frame: an ellipse becomes a circle
        v = (-dx * sin + dy * cos) / stretch
        rho = torch.sqrt(u**2 + v**2)
        index = ((torch.atan2(v, u) + math.pi) / (2 * math.pi) * _ANGLES).long() % _ANGLES
        edge = lesion.radius[index]  # (S, S), r(θ) at each pixel's angle
        inside = rho < edge
        mask |= inside
        alpha = torch.sigmoid((edge - rho) / lesion.blur)  # blurred margin
        level = (lesion.level * (1 + 0.3 * _smooth_field(g, size, (8, 8)))).clamp_min(0.02)
        echo = echo * (1 - alpha + level * alpha)
        # posterior shadow or enhancement over the lesion's width, below its deepest point
        columns = inside.any(0)
        half_width = max(float(columns.sum()) / 2, 1.0)
        bottom = float(yy[inside].max()) if bool(columns.any()) else lesion.cy
        lateral = torch.exp(-(((xx - lesion.cx) / (0.9 * half_width)) ** 4))
        depth = torch.sigmoid((yy - bottom) / 3) * torch.exp(-(yy - bottom).clamp_min(0) / (0.6 * size))
        posterior = posterior * (1 + lesion.posterior * lateral * depth * (1 - alpha))
    echo = echo * posterior * torch.exp(-_uniform(g, 0.2, 0.9) * yy / size)  # attenuation with depth
    speckle_field = rayleigh_speckle(size, g)
    envelope = echo * speckle_field if speckle else echo
    db = 20 * torch.log10(envelope.clamp_min(1e-6) / 5.0)  # 0 dB at 5x the brightest tissue level
    image = ((db + DYNAMIC_RANGE_DB) / DYNAMIC_RANGE_DB * 255).round().clamp(0, 255).to(torch.uint8)
    return PhantomImage(image, mask, len(lesions), echo)


def count_lesions(seed: int, *, size: int = 256) -> int:
    """Lesions :func:`render_phantom` places for ``seed``, without rendering (microseconds)."""
    return len(_layout(torch.Generator().manual_seed(seed), size))


def phantom_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a phantom with ``seed`` (decorrelated)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PhantomDataset(SegmentationDataset):
    """``num_images`` synthetic breast-ultrasound images, rendered on the fly (no files).

    Items are the same as the folder datasets': id ``phantom/000123``, a three-channel
    uint8 image with greyscale content and a binary mask; labels (strata) are
    ``"lesions=k"``. Image ``i`` depends only on (seed, i, size).

    Args:
        num_images: number of images.
        size: image side in pixels.
        seed: phantom seed; different seeds give unrelated images.
        transform: applied to each :class:`RawSample`; default :class:`NormalizeTransform`.

    Example:
        >>> ds = PhantomDataset(4, size=64)
        >>> s = ds[0]
        >>> s.id, tuple(s.image.shape), tuple(s.mask.shape)
        ('phantom/000000', (3, 64, 64), (64, 64))
    """

    def __init__(self, num_images: int, *, size: int = 256, seed: int = 0, transform: Transform | None = None) -> None:
        super().__init__(NormalizeTransform() if transform is None else transform)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ValueError(f"size must be an int >= 32, got {size!r}")
        self.num_images, self.size, self.seed = num_images, size, seed
        self._items = list(range(num_images))
        self.ids = [f"phantom/{i:06d}" for i in range(num_images)]
        self.labels = [f"lesions={self.num_lesions(i)}" for i in range(num_images)]

    def render(self, index: int, *, speckle: bool = True) -> PhantomImage:
        """The full :class:`PhantomImage` of item ``index`` of this (sub)set."""
        return render_phantom(phantom_seed(self.seed, self._items[index]), size=self.size, speckle=speckle)

    def num_lesions(self, index: int) -> int:
        """Lesions in image ``index`` (cheap: no rendering)."""
        return count_lesions(phantom_seed(self.seed, self._items[index]), size=self.size)

    def _load_item(self, item: Any, item_id: str) -> RawSample:
        rendered = render_phantom(phantom_seed(self.seed, item), size=self.size)
        image = rendered.image.unsqueeze(0).repeat(3, 1, 1)  # (3, S, S)
        return RawSample(tv_tensors.Image(image), tv_tensors.Mask(rendered.mask.to(torch.uint8)), item_id)

    def __repr__(self) -> str:
        return f"PhantomDataset({self.num_images} images, size={self.size}, seed={self.seed})"
