"""Predict lesion masks with a trained checkpoint.

    python -m examples.predict CHECKPOINT INPUT [--out DIR] [--device auto|cpu|cuda]

CHECKPOINT is a best.pt or last.pt written by examples/train_busi.py (it carries the model
configuration). INPUT is an image file or a folder of images (png, jpg, bmp, tif); files named
like masks (`*_mask*.png`) are skipped. For each image, DIR receives `<name>_pred.png` (the mask,
0/255, at the image's original size) and `<name>_overlay.png` (prediction tinted red).
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import argparse
from typing import Any

import numpy as np
import torch
from PIL import Image

from torchvision import tv_tensors

from examples.data.folders import DataError, read_image
from examples.engine.evaluate import overlay_picture, predict_full
from examples.data.samples import RawSample
from examples.engine.trainer import TrainConfig, pick_device
from examples.data.transforms import EvalTransform

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The state dict that examples/train_busi.py saved (``last.pt`` or ``best.pt``), or a clear
    SystemExit for a missing, unreadable or foreign file."""
    try:
        state = torch.load(path, map_location=device, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise SystemExit(f"{path} is not a checkpoint of examples/train_busi.py (cannot read it: {error})") from error
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise SystemExit(f"{path} is not a checkpoint of examples/train_busi.py (no 'model' and 'config' entries)")
    return state


def model_from_checkpoint(state: dict[str, Any]) -> tuple[torch.nn.Module, TrainConfig]:
    """The network of a checkpoint read by :func:`read_checkpoint`, with its weights, and the
    run's configuration. No ImageNet download: the checkpoint holds every weight."""
    from examples.train_busi import build_model

    fields = {f for f in TrainConfig.__dataclass_fields__}
    config = TrainConfig(**{k: v for k, v in state["config"].items() if k in fields})
    config.pretrained, config.weights = False, None  # the checkpoint holds every weight
    model = build_model(config)
    model.load_state_dict(state["model"])
    return model, config


def load_model(path: Path, device: torch.device) -> tuple[torch.nn.Module, TrainConfig]:
    model, config = model_from_checkpoint(read_checkpoint(path, device))
    return model.to(device).eval(), config


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
    parser.add_argument("checkpoint", type=Path, help="best.pt or last.pt from examples/train_busi.py")
    parser.add_argument("input", type=Path, help="an image file or a folder of images")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default %(default)s)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="(default %(default)s)")
    args = parser.parse_args(argv)

    device = pick_device(args.device)
    model, config = load_model(args.checkpoint, device)
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
