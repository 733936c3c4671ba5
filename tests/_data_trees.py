"""Small synthetic dataset folders that reproduce the layouts and quirks of real BUSI and UDIAT.

Images are smooth random fields (each one distinct, so that unrelated images never look like
near-duplicates) stored as RGB PNGs with greyscale content; masks are rectangles stored in the
PNG modes BUSI uses.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
    """(H, W) uint8: coarse random noise (about 4 px per node) upsampled, distinct per seed."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(20, 235, size=(max(6, height // 4), max(7, width // 4)), dtype=np.uint8))
    return np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC))


def rect_mask(height: int, width: int, top: int, left: int, bottom: int, right: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def save_rgb(grey: np.ndarray, path: Path) -> None:
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(path)


def save_mask(mask: np.ndarray, path: Path, mode: str) -> None:
    """Store a bool mask as BUSI does: '1' (1-bit), 'L' (0/255), 'RGB' or 'RGBA' (alpha 255)."""
    if mode == "1":
        Image.fromarray(mask).convert("1").save(path)
    elif mode == "L":
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
    elif mode == "RGB":
        Image.fromarray(np.repeat(mask[..., None].astype(np.uint8) * 255, 3, axis=2)).save(path)
    elif mode == "RGBA":
        rgba = np.zeros((*mask.shape, 4), dtype=np.uint8)
        rgba[..., :3] = mask[..., None] * 255
        rgba[..., 3] = 255  # opaque everywhere: black-and-opaque must read as background
        Image.fromarray(rgba, mode="RGBA").save(path)
    else:
        raise ValueError(mode)


def make_busi_tree(root: Path) -> dict[str, np.ndarray]:
    """A BUSI-like tree with every quirk; returns the expected merged mask per id.

    - ``benign (1)``: 1-bit mask, 40 x 50.
    - ``benign (2)``: three mask files (L, RGB, RGBA) that must be OR-merged.
    - ``benign (3)``: a colour overlay on the image, odd size 37 x 61, RGBA mask.
    - ``benign (10)``: for natural ordering (after ``benign (3)``).
    - ``malignant (1)``: byte-identical copy of ``benign (2).png`` (exact duplicate across classes).
    - ``malignant (2)``: ``benign (1)`` brightened by 3 grey levels (near duplicate).
    - ``malignant (3)``: RGB mask.
    - ``normal (1)``: empty RGB mask; plus a dotfile and a non-image file, both ignored.
    """
    for name in ("benign", "malignant", "normal"):
        (root / name).mkdir(parents=True)
    expected: dict[str, np.ndarray] = {}
    b, m, n = root / "benign", root / "malignant", root / "normal"

    grey = smooth_image(1, 40, 50)
    save_rgb(grey, b / "benign (1).png")
    mask = rect_mask(40, 50, 5, 5, 20, 30)
    save_mask(mask, b / "benign (1)_mask.png", "1")
    expected["benign/benign (1).png"] = mask

    save_rgb(smooth_image(2, 44, 52), b / "benign (2).png")
    parts = [rect_mask(44, 52, 2, 2, 10, 10), rect_mask(44, 52, 20, 20, 30, 40), rect_mask(44, 52, 35, 3, 42, 9)]
    for part, suffix, mode in zip(parts, ("_mask", "_mask_1", "_mask_2"), ("L", "RGB", "RGBA")):
        save_mask(part, b / f"benign (2){suffix}.png", mode)
    expected["benign/benign (2).png"] = parts[0] | parts[1] | parts[2]

    overlay = np.repeat(smooth_image(3, 37, 61)[..., None], 3, axis=2)
    overlay[10:13, 5:40] = (255, 255, 0)  # a yellow caliper line
    overlay[20:25, 30:35] = (0, 200, 255)  # a cyan mark
    Image.fromarray(overlay).save(b / "benign (3).png")
    mask = rect_mask(37, 61, 8, 8, 30, 50)
    save_mask(mask, b / "benign (3)_mask.png", "RGBA")
    expected["benign/benign (3).png"] = mask

    save_rgb(smooth_image(10, 30, 30), b / "benign (10).png")
    mask = rect_mask(30, 30, 0, 0, 30, 30)  # lesion touching every border
    save_mask(mask, b / "benign (10)_mask.png", "1")
    expected["benign/benign (10).png"] = mask

    shutil.copyfile(b / "benign (2).png", m / "malignant (1).png")
    mask = rect_mask(44, 52, 15, 15, 25, 25)
    save_mask(mask, m / "malignant (1)_mask.png", "1")
    expected["malignant/malignant (1).png"] = mask

    save_rgb(np.clip(grey.astype(int) + 3, 0, 255).astype(np.uint8), m / "malignant (2).png")
    mask = rect_mask(40, 50, 6, 6, 18, 28)
    save_mask(mask, m / "malignant (2)_mask.png", "1")
    expected["malignant/malignant (2).png"] = mask

    save_rgb(smooth_image(4, 33, 47), m / "malignant (3).png")
    mask = rect_mask(33, 47, 3, 20, 30, 44)
    save_mask(mask, m / "malignant (3)_mask.png", "RGB")
    expected["malignant/malignant (3).png"] = mask

    save_rgb(smooth_image(5, 36, 36), n / "normal (1).png")
    save_mask(np.zeros((36, 36), dtype=bool), n / "normal (1)_mask.png", "RGB")
    expected["normal/normal (1).png"] = np.zeros((36, 36), dtype=bool)
    (n / ".DS_Store").write_bytes(b"\x00\x01")
    (b / "README.txt").write_text("not an image")
    return expected


def make_paired_tree(root: Path, images: str = "images", masks: str = "masks", count: int = 4) -> dict[str, np.ndarray]:
    """An images/ + masks/ tree (UDIAT style) with ``count`` pairs; returns masks per id."""
    (root / images).mkdir(parents=True)
    (root / masks).mkdir(parents=True)
    expected = {}
    for i in range(count):
        name = f"{i + 1:06d}.png"
        height, width = 30 + i, 40 + 2 * i
        save_rgb(smooth_image(100 + i, height, width), root / images / name)
        mask = rect_mask(height, width, 4, 4 + i, 20, 30)
        save_mask(mask, root / masks / name, "L")
        expected[f"{images}/{name}"] = mask
    return expected


def make_udiat_tree(root: Path, count: int = 6, size: tuple[int, int] = (30, 40)) -> dict[str, np.ndarray]:
    """UDIAT Dataset B's layout: ``original/000001.png`` ... with ``GT/000001.png`` ..., returns masks per id.

    Images are 8-bit greyscale PNGs, masks greyscale PNGs with lesion 255 on background 0, the
    convention of the copies in circulation; one lesion per image, as in Dataset B.
    """
    (root / "original").mkdir(parents=True)
    (root / "GT").mkdir(parents=True)
    expected = {}
    height, width = size
    for i in range(count):
        name = f"{i + 1:06d}.png"
        Image.fromarray(smooth_image(200 + i, height, width)).save(root / "original" / name)
        top, left = 2 + i % (height // 3), 3 + (2 * i) % (width // 3)
        mask = rect_mask(height, width, top, left, top + height // 2, left + width // 2)
        save_mask(mask, root / "GT" / name, "L")
        expected[f"original/{name}"] = mask
    return expected


def truncate(path: Path) -> None:
    """Cut a PNG in half: the header still reads, the pixel data does not."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
