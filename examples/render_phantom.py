"""Draw phantom samples to a PNG: images on top, the same images with the mask outline below.

    python -m examples.render_phantom --out docs/img/phantom.png [--columns 4] [--size 256] [--seed 0]
    python -m examples.render_phantom --out docs/img/phantom-hyperechoic.png --hyperechoic 0.5
    python -m examples.render_phantom --time 200      # median render time per image, no PNG

The columns show the first images of the phantom with 0, 1, 2 and 3 lesions (then the next
ones), so every lesion count appears. docs/img/phantom.png is made by this script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import time

import numpy as np
from PIL import Image

from examples.data.phantom_dataset import PhantomDataset


def pick_indices(dataset: PhantomDataset, columns: int) -> list[int]:
    """The first image with each lesion count 0..3, then the next unused ones."""
    chosen: list[int] = []
    for count in range(4):
        found = next((i for i in range(len(dataset)) if dataset.num_lesions(i) == count), None)
        if found is not None:
            chosen.append(found)
    chosen += [i for i in range(len(dataset)) if i not in chosen]
    return sorted(chosen[:columns])


def outline(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    padded = np.pad(mask, 1, mode="edge")
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def render_grid(dataset: PhantomDataset, indices: list[int], levels: int = 128) -> Image.Image:
    """A palette image: ``levels`` grey levels (speckle does not compress, fewer levels keep
    the PNG small) plus one red entry for the outlines."""
    rows = []
    step = 256 // levels
    for index in indices:
        sample = dataset.render(index)
        grey = (sample.image.numpy() // step).astype(np.uint8)  # palette index of each grey level
        marked = grey.copy()
        marked[outline(sample.mask.numpy())] = levels  # the red entry
        rows.append(np.concatenate([grey, marked], axis=0))
    image = Image.fromarray(np.concatenate(rows, axis=1), mode="P")
    palette = [v for i in range(levels) for v in (i * step + step // 2,) * 3] + [255, 40, 40]
    image.putpalette(palette)
    return image


def time_renders(dataset: PhantomDataset, count: int) -> tuple[float, float, float]:
    """Seconds per render of images 1..count (after one warm-up render): median and quartiles."""
    dataset.render(0)
    seconds = []
    for index in range(1, count + 1):
        start = time.perf_counter()
        dataset.render(index)
        seconds.append(time.perf_counter() - start)
    low, median, high = np.percentile(seconds, [25, 50, 75])
    return float(median), float(low), float(high)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/img/phantom.png", help="PNG to write (default docs/img/phantom.png)")
    parser.add_argument("--columns", type=int, default=4, help="number of samples (default 4)")
    parser.add_argument("--size", type=int, default=256, help="image side (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0)")
    parser.add_argument("--hyperechoic", type=float, default=0.0,
                        help="probability that a lesion is brighter than the tissue, in [0, 1] (default 0)")
    parser.add_argument("--time", type=int, default=0, metavar="N",
                        help="instead of drawing, time N renders at --size and print the median (a measurement, not a test)")
    args = parser.parse_args(argv)
    if not 0.0 <= args.hyperechoic <= 1.0:
        parser.error(f"--hyperechoic must be in [0, 1], got {args.hyperechoic}")
    if args.time < 0:
        parser.error(f"--time must be >= 0, got {args.time}")
    if args.time:
        timed = PhantomDataset(args.time + 1, size=args.size, seed=args.seed, hyperechoic=args.hyperechoic)
        median, low, high = time_renders(timed, args.time)
        print(f"{median * 1e3:.1f} ms per {args.size} x {args.size} image "
              f"(median of {args.time} renders, quartiles {low * 1e3:.1f}-{high * 1e3:.1f} ms)")
        return 0
    dataset = PhantomDataset(max(64, 4 * args.columns), size=args.size, seed=args.seed,
                             hyperechoic=args.hyperechoic)
    indices = pick_indices(dataset, args.columns)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    render_grid(dataset, indices).save(out, optimize=True)
    counts = ", ".join(f"{dataset.ids[i]}: {dataset.num_lesions(i)} lesions" for i in indices)
    print(f"wrote {out} ({counts})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
