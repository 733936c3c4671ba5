"""Write a duplicate-aware, stratified k-fold split file for a dataset.

    python -m examples.make_splits DATA_DIR --folds 5 --seed 0 --out splits.json
    python -m examples.make_splits phantom --count 200 --out phantom_splits.json

DATA_DIR is a BUSI folder (benign/ malignant/ [normal/]) or an images/ + masks/ folder
(UDIAT's original/ + GT/ works too). Ids in the file are image paths relative to DATA_DIR.
Every image is decoded once to find exact and near duplicates, which always share a fold; the
groups found are printed and recorded in the file. Re-running with the same arguments gives a
byte-identical file. The format is described in docs/data.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
from typing import Callable, Iterable

from examples.data.folders import DataError
from examples.data.registry import DataOptions, build_dataset
from examples.data.duplicates import NEAR_THRESHOLD, find_duplicates
from examples.data.splits import DEFAULT_FRACTIONS, dataset_greys, make_splits, write_splits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", help="data directory, or the word 'phantom'")
    parser.add_argument("--out", required=True, help="path of the JSON split file to write")
    parser.add_argument("--folds", type=int, default=5, help="number of folds (default 5)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="share of each training fold kept for validation (default 0.1; 0 for none)")
    parser.add_argument("--fractions", nargs="+", default=list(DEFAULT_FRACTIONS),
                        help="labeled fractions of the training fold (default 1/2 1/4 1/8)")
    parser.add_argument("--near-threshold", type=int, default=NEAR_THRESHOLD,
                        help=f"Hamming distance (of 256 bits) for near-duplicates (default {NEAR_THRESHOLD}; -1: off)")
    parser.add_argument("--include-normal", action="store_true", help="BUSI: also split normal/ (default: abnormal only)")
    parser.add_argument("--count", type=int, default=DataOptions.phantom_count,
                        help="phantom: number of images (default %(default)s)")
    parser.add_argument("--phantom-size", type=int, default=DataOptions.phantom_size,
                        help="phantom: image side (default %(default)s)")
    parser.add_argument("--phantom-seed", type=int, default=DataOptions.phantom_seed,
                        help="phantom: generator seed (default %(default)s)")
    parser.add_argument("--no-lesion-free", dest="lesion_free", action="store_false",
                        help="phantom: leave out the lesion-free images (default: kept)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    try:
        dataset = build_dataset(args.data, include_normal=args.include_normal, phantom_count=args.count,
                                phantom_size=args.phantom_size, phantom_seed=args.phantom_seed,
                                phantom_lesion_free=args.lesion_free)
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None
        if not args.quiet:
            from tqdm import tqdm

            def progress(items: Iterable[int]) -> Iterable[int]:
                return tqdm(items, desc="hashing", unit="img", file=sys.stderr)

        duplicates = find_duplicates(dataset_greys(dataset, progress), threshold=args.near_threshold)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:
        splits = make_splits(dataset.ids, dataset.labels, duplicates, folds=args.folds, seed=args.seed,
                             val_fraction=args.val_fraction, fractions=args.fractions)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if args.data == "phantom":
        splits["data"] = {"name": "phantom", "count": args.count, "size": args.phantom_size, "seed": args.phantom_seed,
                          "lesion_free": args.lesion_free}
    else:
        splits["data"] = {"name": Path(args.data).resolve().name, "include_normal": args.include_normal}
    write_splits(splits, args.out)

    print(f"{dataset!r}: {splits['labels']}")
    print(f"exact-duplicate groups: {len(splits['duplicates']['exact'])}, near-duplicate pairs "
          f"(<= {args.near_threshold} bits): {len(splits['duplicates']['near'])}, groups of size > 1: "
          f"{len(splits['groups'])}")
    for group in splits["groups"]:
        print("  group:", " | ".join(group))
    for k, fold in enumerate(splits["folds"]):
        counts = fold["counts"]
        labeled = ", ".join(f"{key}: {n}" for key, n in counts["labeled"].items())
        print(f"fold {k}: train {counts['train']}, val {counts['val']}, test {counts['test']}; labeled {labeled}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
