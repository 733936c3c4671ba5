"""Predict lesion masks with a trained checkpoint.

    python -m examples.predict CHECKPOINT INPUT [--out DIR] [--device auto|cpu|cuda]

CHECKPOINT is a best.pt, last.pt or average.pt written by examples/train_busi.py (it carries
the model configuration). INPUT is an image file or a folder of images (png, jpg, bmp, tif); files named
like masks (`*_mask*.png`) are skipped. For each image, DIR receives `<name>_pred.png` (the mask,
0/255, at the image's original size) and `<name>_overlay.png` (prediction tinted red).
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse

import numpy as np
import torch
from PIL import Image

from torchvision import tv_tensors

from examples.data.images import DataError, read_image
from examples.engine.evaluate import overlay_picture, predict_full
from examples.data.samples import RawSample
from examples.engine.distributed import pick_device
from examples.models.trained import load_trained
from examples.data.transforms import EvalTransform

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def inputs(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and "_mask" not in p.stem)
        if files:
            return files
        raise SystemExit(f"{path}: no images ({', '.join(sorted(SUFFIXES))}) found")
    raise SystemExit(f"{path}: no such file or folder")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="best.pt, last.pt or average.pt from examples/train_busi.py")
    parser.add_argument("input", type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default %(default)s)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model, config = load_trained(args.checkpoint, device)
    transform = EvalTransform(config.eval_size or config.crop)  # what the trainer evaluated with
    args.out.mkdir(parents=True, exist_ok=True)
    files = inputs(args.input)
    for path in files:
        try:
            grey = read_image(path)  # (H, W) uint8 luma, as the datasets load images
        except DataError as error:
            raise SystemExit(str(error)) from error
        rgb = np.repeat(grey[..., None], 3, axis=-1)  # (H, W, 3)
        image = tv_tensors.Image(torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1))
        no_mask = tv_tensors.Mask(torch.zeros(grey.shape, dtype=torch.uint8))
        sample = transform(RawSample(image, no_mask, path.name))
        prediction = predict_full(model, sample.image.to(device), tuple(grey.shape)).cpu().numpy()
        Image.fromarray((prediction > 0).astype(np.uint8) * 255).save(args.out / f"{path.stem}_pred.png")
        Image.fromarray(overlay_picture(rgb, prediction, None)).save(args.out / f"{path.stem}_overlay.png")
        print(f"{path} -> {args.out / (path.stem + '_pred.png')} ({100 * (prediction > 0).mean():.1f}% lesion)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
