"""Segmentation datasets read from folders: BUSI and images/ + masks/ (UDIAT).

Both loaders return the same items (:class:`~examples.data.samples.RawSample` before the
transform): a three-channel uint8 image with greyscale content, a binary (H, W) mask and the
image path relative to the data directory as its id.

Real BUSI has quirks, handled here (method.md section 8):

- extra lesions in ``name_mask_1.png``, ``name_mask_2.png``: OR-merged with ``name_mask.png``;
- masks stored as 1-bit, greyscale, RGB, RGBA or palette PNGs: a pixel is lesion when any
  colour channel is > 0 (and, with an alpha channel, alpha > 0);
- images stored as RGB with greyscale content, some with colour overlays (calipers, text):
  every image is converted to 8-bit luma (ITU-R 601, PIL's ``convert("L")``) and replicated
  to three channels, so an overlay becomes a grey mark and the three channels are always equal;
- odd sizes (190 to 1048 px): nothing is resized at load time;
- spaces and parentheses in file names.

Bad input raises :class:`DataError` (a ``ValueError``) naming the offending file or folder.
Headers are read when the dataset is built, so a non-image file, an unreadable header and an
image/mask size mismatch fail at once; a truncated pixel stream only shows when the pixels are
decoded, i.e. on first load, unless ``verify=True`` decodes every pair up front. Nothing is
skipped unless ``skip_bad=True``, which decodes everything up front and warns once per file
it leaves out.
"""

from __future__ import annotations

import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from tqdm import tqdm

from examples.data.base import SegmentationDataset, Transform, natural_key
from examples.data.images import DataError, decoded, header_size, read_image, read_mask
from examples.data.samples import RawSample
from examples.data.transforms import NormalizeTransform

__all__ = [
    "BUSI_CLASSES",
    "BUSIDataset",
    "DataError",
    "ImageMaskFolder",
    "is_busi",
    "paired_layout",
    "not_a_dataset",
    "read_image",
    "read_mask",
]

BUSI_CLASSES = ("benign", "malignant", "normal")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# images/ + masks/ folder names that are recognised, in order: the generic layout and the
# layout UDIAT's "Dataset B" ships with.
PAIRED_LAYOUTS = (("images", "masks"), ("original", "GT"))
_BUSI_MASK = re.compile(r"^(?P<stem>.+)_mask(?:_(?P<extra>\d+))?$")


@dataclass(frozen=True)
class _Record:
    image: Path
    masks: tuple[Path, ...]


class _FolderDataset(SegmentationDataset):
    """Shared checking and loading for folder datasets; items are ``_Record``s."""

    root: Path

    def _finish(self, records: list[tuple[str, str, _Record]], *, verify: bool, skip_bad: bool,
                what: str) -> None:
        kept: list[tuple[str, str, _Record]] = []
        decode = verify or skip_bad
        progress = (tqdm(records, desc=f"checking {len(records)} images and their masks", unit="image", leave=False,
                         file=sys.stderr) if decode else records)
        for item_id, label, record in progress:
            try:
                self._check_record(record, decode=decode)
            except DataError as error:
                if not skip_bad:
                    raise
                warnings.warn(f"skipping {item_id}: {error}", stacklevel=3)
                continue
            kept.append((item_id, label, record))
        if not kept:
            raise DataError(f"{what} in {self.root} holds no usable image/mask pairs (empty dataset)")
        self.ids = [r[0] for r in kept]
        self.labels = [r[1] for r in kept]
        self.items = [r[2] for r in kept]

    @staticmethod
    def _check_record(record: _Record, *, decode: bool) -> None:
        size = header_size(record.image)
        for mask in record.masks:
            mask_size = header_size(mask)
            if mask_size != size:
                raise DataError(
                    f"mask {mask} is {mask_size[0]}x{mask_size[1]} (W x H) but its image "
                    f"{record.image} is {size[0]}x{size[1]}"
                )
        if decode:
            read_image(record.image)
            for mask in record.masks:
                read_mask(mask)

    def load_item(self, item: Any, item_id: str) -> RawSample:
        record: _Record = item
        grey = read_image(record.image)
        merged = np.zeros(grey.shape, dtype=bool)
        for mask_path in record.masks:  # extra lesions live in extra files: OR them
            mask = read_mask(mask_path)
            if mask.shape != grey.shape:
                raise DataError(
                    f"mask {mask_path} has shape {mask.shape} (H, W) but its image {record.image} "
                    f"has shape {grey.shape}"
                )
            merged |= mask
        # replicate in numpy: no intra-op threads to wake up for a copy (see examples/data/phantom.py)
        image = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(grey, (3, *grey.shape))))  # (3, H, W)
        return RawSample(tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(merged.astype(np.uint8))), item_id)

    def load_grey(self, index: int) -> np.ndarray:
        return read_image(self.items[index].image)

    def records(self) -> list[tuple[str, Path, tuple[Path, ...]]]:
        """(id, image path, mask paths) for every item, for inspection and tests."""
        return [(i, r.image, r.masks) for i, r in zip(self.ids, self.items)]


def _image_files(folder: Path) -> list[Path]:
    """Image files of a folder in natural order; dotfiles and other extensions are ignored."""
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
             and p.suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(files, key=lambda p: natural_key(p.name))


def _by_stem(files: Iterable[Path]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in files:
        if path.stem in found:
            raise DataError(f"two files share the name {path.stem!r}: {found[path.stem]} and {path}")
        found[path.stem] = path
    return found


def _bad_pair(message: str, path: Path, skip_bad: bool) -> None:
    if not skip_bad:
        raise DataError(message)
    warnings.warn(f"skipping {path}: {message}", stacklevel=4)


class BUSIDataset(_FolderDataset):
    """The BUSI layout: ``benign/``, ``malignant/``, ``normal/`` with ``name_mask*.png`` masks.

    Ids are ``<class>/<file name>``, e.g. ``benign/benign (12).png``, and labels are the
    class. All mask files of an image (``_mask``, ``_mask_1``, ``_mask_2``, ...) are
    OR-merged.

    Args:
        root: the folder holding the class folders.
        include_normal: also load ``normal/`` (empty masks); the paper uses the abnormal
            images only, which is the default.
        transform: applied to each :class:`RawSample`; default :class:`NormalizeTransform`.
        verify: decode every image and mask when the dataset is built.
        skip_bad: leave out bad files with a warning each instead of raising (decodes all).

    Raises:
        DataError: naming the file or folder that is not usable.
    """

    def __init__(self, root: str | Path, *, include_normal: bool = False, transform: Transform | None = None,
                 verify: bool = False, skip_bad: bool = False) -> None:
        super().__init__(NormalizeTransform() if transform is None else transform)
        self.root = Path(root)
        self.include_normal = include_normal
        if not is_busi(self.root):
            raise DataError(not_a_dataset(self.root))
        classes = BUSI_CLASSES if include_normal else BUSI_CLASSES[:2]
        if include_normal and not (self.root / "normal").is_dir():
            raise DataError(f"include_normal=True but {self.root / 'normal'} is not a folder")
        records: list[tuple[str, str, _Record]] = []
        for label in classes:
            folder = self.root / label
            if folder.is_dir():
                records += self._scan_class(folder, label, skip_bad)
        self._finish(records, verify=verify, skip_bad=skip_bad, what=f"BUSI ({', '.join(classes)})")

    @staticmethod
    def _scan_class(folder: Path, label: str, skip_bad: bool) -> list[tuple[str, str, _Record]]:
        images: list[Path] = []
        masks: dict[str, list[tuple[int, Path]]] = {}
        for path in _image_files(folder):
            match = _BUSI_MASK.match(path.stem)
            if match is None:
                images.append(path)
            else:  # _mask sorts first (extra index -1), then _mask_1, _mask_2, ...
                extra = -1 if match["extra"] is None else int(match["extra"])
                masks.setdefault(match["stem"], []).append((extra, path))
        by_stem = _by_stem(images)
        for stem, found in masks.items():
            if stem not in by_stem:
                _bad_pair(f"mask {found[0][1]} has no image {stem}.png in {folder}", found[0][1], skip_bad)
        records = []
        for stem, image in by_stem.items():
            if stem not in masks:
                _bad_pair(f"image {image} has no mask ({stem}_mask.png) in {folder}", image, skip_bad)
                continue
            paths = tuple(p for _, p in sorted(masks[stem], key=lambda t: t[0]))
            records.append((f"{label}/{image.name}", label, _Record(image, paths)))
        return records

    def __repr__(self) -> str:
        return f"BUSIDataset({str(self.root)!r}, {len(self)} images, include_normal={self.include_normal})"


class ImageMaskFolder(_FolderDataset):
    """Images and masks in two folders with the same file names (UDIAT Dataset B, and others).

    ``images/`` + ``masks/`` by default; UDIAT's own ``original/`` + ``GT/`` is recognised
    too. Files pair by name without extension (``a.png`` with ``a.png`` or ``a.bmp``). Ids are
    ``<images folder>/<file name>`` and every label is ``"all"``.

    Args:
        root: the folder holding the two folders.
        images, masks: their names; None picks the first of ``images/masks`` or
            ``original/GT`` that exists.
        transform, verify, skip_bad: as in :class:`BUSIDataset`.

    Raises:
        DataError: naming the file or folder that is not usable.
    """

    def __init__(self, root: str | Path, *, images: str | None = None, masks: str | None = None,
                 transform: Transform | None = None, verify: bool = False, skip_bad: bool = False) -> None:
        super().__init__(NormalizeTransform() if transform is None else transform)
        self.root = Path(root)
        if images is None or masks is None:
            layout = paired_layout(self.root)
            if layout is None:
                raise DataError(not_a_dataset(self.root))
            images, masks = layout
        self.images_dir, self.masks_dir = images, masks
        for name in (images, masks):
            if not (self.root / name).is_dir():
                raise DataError(f"{self.root / name} is not a folder")
        image_files = _by_stem(_image_files(self.root / images))
        mask_files = _by_stem(_image_files(self.root / masks))
        for stem, path in mask_files.items():
            if stem not in image_files:
                _bad_pair(f"mask {path} has no image named {stem}.* in {self.root / images}", path, skip_bad)
        records = []
        for stem, path in image_files.items():
            if stem not in mask_files:
                _bad_pair(f"image {path} has no mask named {stem}.* in {self.root / masks}", path, skip_bad)
                continue
            records.append((f"{images}/{path.name}", "all", _Record(path, (mask_files[stem],))))
        self._finish(records, verify=verify, skip_bad=skip_bad, what=f"{images}/ + {masks}/")

    def __repr__(self) -> str:
        return f"ImageMaskFolder({str(self.root)!r}, {len(self)} images, {self.images_dir}/ + {self.masks_dir}/)"


def is_busi(root: Path) -> bool:
    """True when ``root`` holds a ``benign/`` or ``malignant/`` folder."""
    return any((root / name).is_dir() for name in BUSI_CLASSES[:2])


def paired_layout(root: Path) -> tuple[str, str] | None:
    for images, masks in PAIRED_LAYOUTS:
        if (root / images).is_dir() and (root / masks).is_dir():
            return images, masks
    return None


def not_a_dataset(root: Path) -> str:
    if not root.exists():
        return f"data directory {root} does not exist"
    if not root.is_dir():
        return f"data directory {root} is not a folder"
    message = (
        f"{root} is not a dataset: expected the BUSI layout (benign/, malignant/, optionally normal/) "
        f"or image and mask folders with the same file names ({', '.join(f'{a}/ + {b}/' for a, b in PAIRED_LAYOUTS)})"
    )
    inner = [p for p in root.iterdir() if p.is_dir() and (is_busi(p) or paired_layout(p) is not None)]
    if len(inner) == 1:
        message += f"; did you mean {inner[0]}?"
    return message
