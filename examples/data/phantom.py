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
   width 0.5-4 px. Inside, E drops to 5-40% of the tissue; with ``hyperechoic=p`` a fraction p of
   the lesions is instead 1.8-3x as bright as the tissue, with a weak posterior effect (±30%).
3. **Posterior acoustic effect** below each lesion: a shadow (E x 0.35-0.7) or an enhancement
   (E x 1.3-1.8) over the lesion's width, fading with depth.
4. **Depth attenuation** exp(-α·y).
5. **Speckle**: the envelope is E times a Rayleigh-distributed field, the magnitude of a
   complex Gaussian field filtered by an anisotropic point-spread function (grains longer
   laterally than axially), scaled to mean 1.
6. **Log compression** to 8 bits over a 40 dB dynamic range.

The mask is the union of the lesion shapes (the pixels inside r(θ)).

The renderer is numpy (float32), single-threaded by nature: with torch ops, two threads on a busy
2-core machine once made a 6 ms render take 760 ms (and one thread per render cost ~20 ms).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch import Tensor


__all__ = [
    "LESION_COUNT_PROBS",
    "PHANTOM_SIZE",
    "PhantomImage",
    "count_lesions",
    "phantom_seed",
    "rayleigh_speckle",
    "render_phantom",
]

LESION_COUNT_PROBS = (0.2, 0.45, 0.25, 0.1)
"""Probability of 0, 1, 2 and 3 lesions in an image."""
DYNAMIC_RANGE_DB = 40.0
PHANTOM_SIZE = 256  # image side by default, in pixels
PHANTOM_COUNT = 240  # images by default: the trainer's, make_splits' and build_dataset's
_ANGLES = 360  # resolution of the r(θ) lookup table

Rng = np.random.Generator


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


def _uniform(rng: Rng, low: float, high: float) -> float:
    return low + (high - low) * float(rng.random())


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)  # the logistic function, without exp overflow


def _smooth_field(rng: Rng, size: int, coarse: tuple[int, int]) -> np.ndarray:
    """Zero-mean, unit-ish smooth random field: (rows, cols) Gaussian noise upsampled bicubically."""
    noise = rng.standard_normal(coarse, dtype=np.float32)
    return np.asarray(Image.fromarray(noise, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _gaussian_kernel(sigma: float) -> np.ndarray:
    radius = max(1, math.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float32)
    k = np.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _blur(x: np.ndarray, kernel: np.ndarray, axis: int) -> np.ndarray:
    """Circular convolution of ``x`` with a 1-D kernel along ``axis``: a sum of shifted views
    of one wrapped copy (single-channel ``conv2d`` is ~10x slower)."""
    radius, size = len(kernel) // 2, x.shape[axis]
    wrapped = np.concatenate([x.take(range(size - radius, size), axis), x, x.take(range(radius), axis)], axis)
    index = [slice(None)] * x.ndim
    out = np.zeros_like(x)
    for j, weight in enumerate(kernel):
        index[axis] = slice(j, j + size)
        out += weight * wrapped[tuple(index)]
    return out


def rayleigh_speckle(size: int, rng: Rng, *, axial_sigma: float = 0.6, lateral_sigma: float = 1.3) -> np.ndarray:
    """Multiplicative speckle of mean 1: |h * (n1 + i n2)| with a separable Gaussian PSF h.

    A sum of many random phasors has a complex Gaussian amplitude, whose magnitude is
    Rayleigh distributed (std / mean = sqrt(4/π - 1) ≈ 0.523). Filtering the two Gaussian
    fields by the same PSF keeps them Gaussian with variance Σh², so the mean of the
    magnitude is known exactly: sqrt(Σh²)·sqrt(π/2).

    Args:
        size: side of the square field.
        rng: a ``numpy.random.Generator``.
        axial_sigma, lateral_sigma: PSF widths in pixels along depth (rows) and across (columns).

    Returns:
        (size, size) float32 field, mean 1.

    Example:
        >>> field = rayleigh_speckle(128, np.random.default_rng(0))
        >>> field.shape, round(float(field.mean()), 1)
        ((128, 128), 1.0)
    """
    noise = rng.standard_normal((2, size, size), dtype=np.float32)  # real and imaginary parts
    ky, kx = _gaussian_kernel(axial_sigma), _gaussian_kernel(lateral_sigma)
    blurred = _blur(_blur(noise, ky, axis=1), kx, axis=2)  # (2, S, S)
    sigma = math.sqrt(float((ky**2).sum() * (kx**2).sum()))
    magnitude = np.sqrt(blurred[0] ** 2 + blurred[1] ** 2)  # (S, S)
    return magnitude / np.float32(sigma * math.sqrt(math.pi / 2))


def _tissue(rng: Rng, size: int, depth: np.ndarray) -> np.ndarray:
    """Layered echogenicity: skin, fat, fibroglandular tissue, deep fat / muscle.

    ``depth`` is the (S, 1) column of row indices; depth-only terms stay 1-D until broadcast.
    """
    x = np.linspace(0, 1, size, dtype=np.float32)

    def boundary(level: float, wobble: float) -> np.ndarray:  # (1, S): a wavy horizontal interface
        wave = np.interp(x, np.linspace(0, 1, 6), rng.standard_normal(6)).astype(np.float32)
        sine = np.sin(2 * math.pi * (x * _uniform(rng, 0.5, 2) + _uniform(rng, 0, 1)))
        return (level + wobble * wave + 0.02 * sine)[None, :]

    skin = _uniform(rng, 0.03, 0.07)
    fat_end = boundary(_uniform(rng, 0.18, 0.35), 0.03)
    gland_end = boundary(_uniform(rng, 0.6, 0.85), 0.05)
    width = 0.015 * size
    below_fat = _sigmoid((depth - fat_end * size) / width)  # (S, S)
    below_gland = _sigmoid((depth - gland_end * size) / width)  # (S, S)
    fat, gland, deep = _uniform(rng, 0.3, 0.5), _uniform(rng, 0.7, 1.0), _uniform(rng, 0.35, 0.6)
    skin_line = 0.8 * np.exp(-(((depth / size) - skin) / 0.012) ** 2)  # (S, 1), bright skin line
    levels = fat + (gland - fat) * below_fat + (deep - gland) * below_gland + skin_line
    fibres = _smooth_field(rng, size, (max(4, size // 6), max(2, size // 40)))  # horizontally long streaks
    lobules = _smooth_field(rng, size, (max(2, size // 24), max(2, size // 24)))
    texture = 1 + 0.25 * fibres * below_fat + 0.3 * lobules * (1 - below_fat)
    return np.maximum(levels * texture, 0.05).astype(np.float32)


class _Lesion(NamedTuple):
    cy: float
    cx: float
    r0: float
    aspect: float  # height / width
    angle: float
    radius: np.ndarray  # (_ANGLES,) r(θ)
    blur: float  # margin width in pixels
    level: float  # echogenicity inside, as a fraction of the tissue's
    posterior: float  # < 0: shadow, > 0: enhancement


def _radius_table(rng: Rng, r0: float) -> np.ndarray:
    """r(θ) on a table of angles: lobulated (m = 2..6) and sometimes spiculated (m = 10..24)."""
    theta = np.linspace(0, 2 * math.pi, _ANGLES, endpoint=False)
    irregular = _uniform(rng, 0.0, 0.3)
    r = np.ones(_ANGLES)
    for m in range(2, 7):
        r += _uniform(rng, 0, irregular / m) * np.cos(m * theta + _uniform(rng, 0, 2 * math.pi))
    if _uniform(rng, 0, 1) < 0.3:
        for m in range(10, 25, 2):
            r += _uniform(rng, 0, 0.04) * np.cos(m * theta + _uniform(rng, 0, 2 * math.pi))
    return (r0 * np.maximum(r, 0.3)).astype(np.float32)


def _layout(rng: Rng, size: int) -> list[_Lesion]:
    """Draw the lesions: a count, then non-overlapping placements (a lesion that finds no
    free spot in 10 tries is dropped) and their shapes. Uses its own generator, so the count
    is known without rendering."""
    count = int(rng.choice(len(LESION_COUNT_PROBS), p=LESION_COUNT_PROBS))
    lesions: list[_Lesion] = []
    for _ in range(count):
        for _ in range(10):
            r0 = size * math.exp(_uniform(rng, math.log(0.03), math.log(0.22)))
            cy, cx = _uniform(rng, 0.22, 0.7) * size, _uniform(rng, 0.12, 0.88) * size
            if all(math.hypot(cy - o.cy, cx - o.cx) > 1.3 * (r0 + o.r0) for o in lesions):
                break
        else:
            continue
        shadow = _uniform(rng, 0, 1) < 0.5
        lesions.append(_Lesion(
            cy, cx, r0,
            aspect=_uniform(rng, 0.55, 1.3),  # wider-than-tall (benign-like) to taller-than-wide
            angle=_uniform(rng, -0.35, 0.35),
            radius=_radius_table(rng, r0),
            blur=_uniform(rng, 0.5, 4.0),  # circumscribed to indistinct margins
            level=_uniform(rng, 0.05, 0.4),  # anechoic cyst to hypoechoic solid mass
            posterior=_uniform(rng, -0.65, -0.3) if shadow else _uniform(rng, 0.3, 0.8),
        ))
    return lesions


def _generators(seed: int) -> tuple[Rng, Rng]:
    """Independent generators for the layout and for the textures/speckle of one image."""
    return np.random.default_rng([seed, 0]), np.random.default_rng([seed, 1])


def render_phantom(seed: int, *, size: int = PHANTOM_SIZE, speckle: bool = True,
                   hyperechoic: float = 0.0) -> PhantomImage:
    """Render one phantom image from a non-negative integer seed; see the module docstring.

    Args:
        seed: any int >= 0; the same seed always gives the same image.
        size: side of the square image in pixels (>= 32).
        speckle: multiply by the Rayleigh speckle field (False gives the smooth envelope).
        hyperechoic: the probability that a lesion is brighter than the tissue, in [0, 1]. At 0
            the image is exactly the one without the option (the draws use a third generator).

    Returns:
        A :class:`PhantomImage`.

    Example:
        >>> p = render_phantom(0, size=64)
        >>> p.image.shape, p.image.dtype, p.mask.dtype, 0 <= p.num_lesions <= 3
        (torch.Size([64, 64]), torch.uint8, torch.bool, True)
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 32:
        raise ValueError(f"size must be an int >= 32, got {size!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    _check_fraction(hyperechoic, "hyperechoic")
    layout_rng, rng = _generators(seed)
    lesions = _layout(layout_rng, size)
    kind = np.random.default_rng([seed, 2])  # a third generator, not drawn from at hyperechoic=0
    lesions = [les._replace(level=_uniform(kind, 1.8, 3.0), posterior=_uniform(kind, -0.3, 0.3))
               if hyperechoic > 0 and kind.random() < hyperechoic else les for les in lesions]
    rows = np.arange(size, dtype=np.float32)[:, None]  # (S, 1): depth y
    cols = np.arange(size, dtype=np.float32)[None, :]  # (1, S): lateral x
    echo = _tissue(rng, size, rows)  # (S, S)
    mask = np.zeros((size, size), dtype=bool)
    posterior = np.ones((size, size), dtype=np.float32)
    interior = _smooth_field(rng, size, (8, 8)) if lesions else np.zeros(1, np.float32)  # texture inside lesions
    for lesion in lesions:
        dy, dx = rows - lesion.cy, cols - lesion.cx  # (S, 1), (1, S)
        cos, sin, stretch = math.cos(lesion.angle), math.sin(lesion.angle), math.sqrt(lesion.aspect)
        u = (dx * cos + dy * sin) * stretch  # (S, S), lesion frame: the ellipse becomes a circle
        v = (dy * cos - dx * sin) / stretch
        rho = np.sqrt(u**2 + v**2)
        index = ((np.arctan2(v, u) + math.pi) * (_ANGLES / (2 * math.pi))).astype(np.int64) % _ANGLES
        edge = lesion.radius[index]  # (S, S), r(θ) at each pixel's angle
        inside = rho < edge
        mask |= inside
        alpha = _sigmoid((edge - rho) / lesion.blur)  # blurred margin
        level = np.maximum(lesion.level * (1 + 0.3 * interior), 0.02)
        echo = echo * (1 - alpha + level * alpha)
        # posterior shadow or enhancement over the lesion's width, below its deepest point
        in_rows, in_cols = inside.any(1), inside.any(0)
        half_width = max(float(in_cols.sum()) / 2, 1.0)
        bottom = float(np.flatnonzero(in_rows).max()) if in_rows.any() else lesion.cy
        lateral = np.exp(-(((cols - lesion.cx) / (0.9 * half_width)) ** 4))  # (1, S)
        below = _sigmoid((rows - bottom) / 3) * np.exp(-np.maximum(rows - bottom, 0) / (0.6 * size))  # (S, 1)
        posterior = posterior * (1 + lesion.posterior * (below * lateral) * (1 - alpha))
    attenuation = np.exp(-_uniform(rng, 0.2, 0.9) * rows / size)  # (S, 1)
    echo = (echo * posterior * attenuation).astype(np.float32)
    envelope = echo * rayleigh_speckle(size, rng) if speckle else echo
    db = 20 * np.log10(np.maximum(envelope, 1e-6) / 5.0)  # 0 dB at 5x the brightest tissue level
    image = np.clip(np.round((db + DYNAMIC_RANGE_DB) * (255 / DYNAMIC_RANGE_DB)), 0, 255).astype(np.uint8)
    return PhantomImage(torch.from_numpy(image), torch.from_numpy(mask), len(lesions), torch.from_numpy(echo))


def _check_fraction(value: float, name: str) -> None:
    """A ValueError unless ``value`` is a number (not a bool) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")


def count_lesions(seed: int, *, size: int = PHANTOM_SIZE) -> int:
    """Lesions :func:`render_phantom` places for ``seed``, without rendering (microseconds)."""
    return len(_layout(_generators(seed)[0], size))


def phantom_seed(seed: int, index: int) -> int:
    """The generator seed of image ``index`` of a phantom with ``seed`` (decorrelated)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint64)[0])
