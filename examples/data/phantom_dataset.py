"""The synthetic phantom as a dataset: rendered on the fly, the same images for the same seed."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors

from examples.data.base import SegmentationDataset, Transform
from examples.data.phantom import (PHANTOM_SIZE, PhantomImage, _check_fraction, count_lesions, phantom_seed,
                                   render_phantom)
from examples.data.samples import RawSample
from examples.data.transforms import NormalizeTransform

__all__ = ["PhantomDataset"]


class PhantomDataset(SegmentationDataset):
    """``num_images`` synthetic breast-ultrasound images, rendered on the fly (no files).

    Items are the same as the folder datasets': id ``phantom/000123``, a three-channel
    uint8 image with greyscale content and a binary mask; labels (strata) are
    ``"lesions=k"``. Image ``i`` depends only on (seed, i, size).

    Args:
        num_images: number of images.
        size: image side in pixels.
        seed: phantom seed; different seeds give unrelated images.
        lesion_free: keep the images without a lesion (about one in five, the phantom's
            "normal" class); False leaves them out, as BUSI runs leave out ``normal/``. Ids
            keep their index among all ``num_images``, so ``phantom/000003`` is the same image
            either way.
        hyperechoic: the probability that a lesion is brighter than the tissue rather than
            darker (see :func:`render_phantom`); 0, the default, renders the images as before.
        transform: applied to each :class:`RawSample`; default :class:`NormalizeTransform`.
        cache: keep each rendered image and mask (size² · 2 bytes per image, 128 KiB at 256 px)
            after its first load, so an epoch does not render the same image again; the items
            are the same either way. Subsets share their parent's cache.

    Example:
        >>> ds = PhantomDataset(4, size=64)
        >>> s = ds[0]
        >>> s.id, tuple(s.image.shape), tuple(s.mask.shape)
        ('phantom/000000', (3, 64, 64), (64, 64))
    """

    def __init__(self, num_images: int, *, size: int = PHANTOM_SIZE, seed: int = 0, lesion_free: bool = True,
                 hyperechoic: float = 0.0, transform: Transform | None = None, cache: bool = True) -> None:
        super().__init__(NormalizeTransform() if transform is None else transform)
        if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images < 1:
            raise ValueError(f"num_images must be a positive int, got {num_images!r}")
        if isinstance(size, bool) or not isinstance(size, int) or size < 32:
            raise ValueError(f"size must be an int >= 32, got {size!r}")
        for flag, name in ((lesion_free, "lesion_free"), (cache, "cache")):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
        _check_fraction(hyperechoic, "hyperechoic")
        # item -> (grey image, mask), both (size, size) uint8; None: no cache
        self._rendered: dict[int, tuple[np.ndarray, np.ndarray]] | None = {} if cache else None
        self.num_images, self.size, self.seed, self.lesion_free = num_images, size, seed, lesion_free
        self.hyperechoic = hyperechoic
        counts = [count_lesions(phantom_seed(seed, i), size=size) for i in range(num_images)]
        self.items = [i for i in range(num_images) if lesion_free or counts[i] > 0]
        if not self.items:
            raise ValueError(f"none of the phantom's {num_images} images has a lesion, and lesion_free=False "
                             "leaves the lesion-free ones out: ask for more images")
        self.ids = [f"phantom/{i:06d}" for i in self.items]
        self.labels = [f"lesions={counts[i]}" for i in self.items]

    def render(self, index: int, *, speckle: bool = True) -> PhantomImage:
        """The full :class:`PhantomImage` of item ``index`` of this (sub)set."""
        return render_phantom(phantom_seed(self.seed, self.items[index]), size=self.size, speckle=speckle,
                              hyperechoic=self.hyperechoic)

    def bright_lesions(self, index: int) -> Tensor:
        """(H, W) bool: the pixels of image ``index``'s mask that a hyperechoic lesion brightens.

        The layout and textures do not depend on ``hyperechoic`` (its draws use their own
        generator), so comparing the image's noise-free echogenicity with the plain render's
        finds them: a bright lesion raises it 4x or more, the 1.5x cut-off leaves margins in.
        All False at ``hyperechoic=0``; the whole mask at 1.
        """
        if not self.hyperechoic:
            return torch.zeros(self.size, self.size, dtype=torch.bool)
        seed = phantom_seed(self.seed, self.items[index])
        rendered = render_phantom(seed, size=self.size, speckle=False, hyperechoic=self.hyperechoic)
        plain = render_phantom(seed, size=self.size, speckle=False)
        return rendered.mask & (rendered.echogenicity > 1.5 * plain.echogenicity)

    def num_lesions(self, index: int) -> int:
        """Lesions in image ``index`` (cheap: no rendering)."""
        return count_lesions(phantom_seed(self.seed, self.items[index]), size=self.size)

    def load_item(self, item: Any, item_id: str) -> RawSample:
        cached = None if self._rendered is None else self._rendered.get(item)
        if cached is None:
            rendered = render_phantom(phantom_seed(self.seed, item), size=self.size, hyperechoic=self.hyperechoic)
            cached = rendered.image.numpy(), rendered.mask.numpy().astype(np.uint8)
            if self._rendered is not None:
                self._rendered[item] = cached
        # fresh arrays on every load, so a transform that works in place cannot alter the cache;
        # replicate in numpy: a parallel torch op here waits for the second core to wake up,
        # which on a busy 2-core machine tripled the cost of an item
        image = np.ascontiguousarray(np.broadcast_to(cached[0], (3, self.size, self.size)))
        mask = cached[1].copy()
        return RawSample(tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask)), item_id)

    def __repr__(self) -> str:
        kept = "" if self.lesion_free else f", lesion-free left out: {len(self.items)} kept"
        bright = f", hyperechoic={self.hyperechoic}" if self.hyperechoic else ""
        return f"PhantomDataset({self.num_images} images, size={self.size}, seed={self.seed}{bright}{kept})"
