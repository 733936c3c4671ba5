"""Decoding image and mask files, whatever their mode, and the error every data problem raises."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["DataError", "decoded", "header_size", "open_image", "read_image", "read_mask"]


class DataError(ValueError):
    """A data directory or file is not usable; the message names the file or folder."""


def open_image(path: Path) -> Image.Image:
    try:
        return Image.open(path)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"cannot read image file {path}: {error}") from error


def decoded(path: Path) -> Image.Image:
    image = open_image(path)
    try:
        image.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        image.close()
        raise DataError(f"cannot decode {path} (corrupt or truncated?): {error}") from error
    return image


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to (H, W) uint8 greyscale (luma), whatever its mode.

    16-bit greyscale is scaled by 1/257 to 8 bits; colour becomes ITU-R 601 luma.
    """
    path = Path(path)
    with decoded(path) as image:
        if image.mode.startswith("I;16") or image.mode in ("I", "F"):
            wide = np.asarray(image, dtype=np.float64)
            return np.clip(np.round(wide / 257.0), 0, 255).astype(np.uint8)
        return np.asarray(image.convert("L"), dtype=np.uint8).copy()


def read_mask(path: str | Path) -> np.ndarray:
    """Decode a mask file to (H, W) bool: lesion where any colour channel > 0 (and alpha > 0)."""
    path = Path(path)
    with decoded(path) as image:
        if image.mode == "P":  # palette index 0 need not be black: look at the colours
            image = image.convert("RGBA")
        array = np.asarray(image)
        if image.mode in ("RGBA", "LA", "PA"):
            return np.asarray((array[..., :-1] > 0).any(axis=-1) & (array[..., -1] > 0))
        if array.ndim == 3:
            return np.asarray((array > 0).any(axis=-1))
        return np.asarray(array > 0)


def header_size(path: Path) -> tuple[int, int]:
    with open_image(path) as image:
        return image.size  # (W, H)
