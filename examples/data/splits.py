"""Duplicate-aware, stratified k-fold split files with nested labeled subsets.

A split file is JSON (see ``docs/data.md`` for the full schema). Per fold it holds ``test``
(the fold), ``val`` (carved from the other folds), ``train`` (the other folds minus ``val``)
and, per labeled fraction, ``labeled`` and ``unlabeled`` with labeled ∪ unlabeled = train.

Duplicates come from :mod:`examples.data.duplicates` (exact pixel hashes and near-duplicate
difference hashes, grouped by union-find). A group is never split: it goes wholly into one
fold, wholly into train or val, and wholly into labeled or unlabeled. Stratification uses a
group's majority label (ties: the first in natural order).

Counts: ``val`` has round(val_fraction x n) images and ``labeled[f]`` has floor(f x n)
images, where n is the size of the training fold *before* val is carved out, so the labeled
counts match the paper's (BUSI: 258/129/64). When groups make an exact count impossible the
count is the largest reachable one below it. Labeled sets are nested (1/8 ⊂ 1/4 ⊂ 1/2).

Everything is deterministic given the seed; the file is written with sorted keys and ids in
natural order, so re-running gives a byte-identical file.
"""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import numpy as np

from examples.data.base import SegmentationDataset, natural_key
from examples.data.duplicates import HASH_SIDE, Duplicates

__all__ = [
    "DEFAULT_FRACTIONS",
    "FoldSplit",
    "dataset_greys",
    "load_split",
    "make_splits",
    "validate_splits",
    "write_splits",
]

DEFAULT_FRACTIONS = ("1/2", "1/4", "1/8")


class FoldSplit(NamedTuple):
    """One fold of a split file at one labeled fraction (ids relative to the data directory)."""

    train: list[str]
    val: list[str]
    test: list[str]
    labeled: list[str]
    unlabeled: list[str]


def _stratified_order(groups: Sequence[int], strata: Sequence[str], rng: np.random.Generator) -> list[int]:
    """Shuffle groups so that every prefix holds the strata in about their overall proportions.

    Each stratum is shuffled; its k-th of m groups gets the key (k + 0.5) / m, and groups are
    sorted by key, so the strata interleave evenly.
    """
    by_stratum: dict[str, list[int]] = {}
    for g in groups:
        by_stratum.setdefault(strata[g], []).append(g)
    keyed = []
    for rank_of_stratum, stratum in enumerate(sorted(by_stratum, key=natural_key)):
        members = by_stratum[stratum]
        for k, position in enumerate(rng.permutation(len(members))):
            keyed.append(((k + 0.5) / len(members), rank_of_stratum, members[int(position)]))
    return [g for _, _, g in sorted(keyed)]


def _fill(order: Sequence[int], sizes: Sequence[int], target: int, chosen: set[int]) -> set[int]:
    """Add whole groups along ``order`` to ``chosen`` until it holds ``target`` images."""
    out = set(chosen)
    total = sum(sizes[g] for g in out)
    for g in order:
        if total == target:
            break
        if g not in out and total + sizes[g] <= target:
            out.add(g)
            total += sizes[g]
    return out


def _assign_folds(sizes: Sequence[int], strata: Sequence[str], folds: int, rng: np.random.Generator) -> list[int]:
    """Stratified group k-fold: each group (largest first, random within a size) goes to the
    fold with the fewest images of its stratum, then the fewest images, then the lowest index."""
    order = sorted(rng.permutation(len(sizes)).tolist(), key=lambda g: -sizes[g])
    per_stratum = {s: [0] * folds for s in set(strata)}
    totals = [0] * folds
    fold_of = [0] * len(sizes)
    for g in order:
        counts = per_stratum[strata[g]]
        fold = min(range(folds), key=lambda f: (counts[f], totals[f], f))
        fold_of[g] = fold
        counts[fold] += sizes[g]
        totals[fold] += sizes[g]
    return fold_of


def _majority(labels: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    return min(counts, key=lambda s: (-counts[s], natural_key(s)))


def _parse_fraction(text: str) -> Fraction:
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError) as error:
        raise ValueError(f"labeled fraction {text!r} is not a fraction like '1/8'") from error
    if not 0 < value <= 1:
        raise ValueError(f"labeled fraction {text!r} must be in (0, 1]")
    return value


def make_splits(
    ids: Sequence[str],
    labels: Sequence[str],
    duplicates: Duplicates,
    *,
    folds: int = 5,
    seed: int = 0,
    val_fraction: float = 0.1,
    fractions: Sequence[str] = DEFAULT_FRACTIONS,
) -> dict[str, Any]:
    """Build the split dictionary (the JSON schema of ``docs/data.md``).

    Args:
        ids: item ids in dataset order (the indices of ``duplicates`` refer to them).
        labels: stratum label per item.
        duplicates: from :func:`find_duplicates` on the same items.
        folds: number of folds, >= 2.
        seed: seed of every random choice.
        val_fraction: share of each training fold carved out as ``val``, in [0, 1).
        fractions: labeled fractions of the training fold, as strings like ``"1/8"``.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int >= 2, got {folds!r}")
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if len(ids) != len(labels) or sum(len(g) for g in duplicates.groups) != len(ids):
        raise ValueError(
            f"ids ({len(ids)}), labels ({len(labels)}) and duplicate groups "
            f"({sum(len(g) for g in duplicates.groups)} items) must describe the same items"
        )
    parsed = sorted({_parse_fraction(f): f for f in fractions}.items())  # smallest first
    group_count = len(duplicates.groups)
    if group_count < folds:
        raise ValueError(f"{len(ids)} images in {group_count} duplicate groups cannot fill {folds} folds")
    sizes = [len(g) for g in duplicates.groups]
    strata = [_majority([labels[i] for i in g]) for g in duplicates.groups]
    fold_of = _assign_folds(sizes, strata, folds, np.random.default_rng([seed, 0]))

    def names(group_ids: Iterable[int]) -> list[str]:
        return sorted((ids[i] for g in group_ids for i in duplicates.groups[g]), key=natural_key)

    out_folds = []
    for k in range(folds):
        rng = np.random.default_rng([seed, 1, k])
        test = [g for g in range(group_count) if fold_of[g] == k]
        rest = [g for g in range(group_count) if fold_of[g] != k]
        n_rest = sum(sizes[g] for g in rest)
        val = _fill(_stratified_order(rest, strata, rng), sizes, round(val_fraction * n_rest), set())
        train = [g for g in rest if g not in val]
        order = _stratified_order(train, strata, rng)
        labeled: dict[str, list[str]] = {}
        unlabeled: dict[str, list[str]] = {}
        chosen: set[int] = set()
        for value, key in parsed:  # nested: each larger set extends the smaller one
            chosen = _fill(order, sizes, int(value * n_rest), chosen)
            labeled[key] = names(chosen)
            unlabeled[key] = names(g for g in train if g not in chosen)
        out_folds.append({
            "train": names(train),
            "val": names(val),
            "test": names(test),
            "labeled": labeled,
            "unlabeled": unlabeled,
            "counts": {
                "train": sum(sizes[g] for g in train),
                "val": sum(sizes[g] for g in val),
                "test": sum(sizes[g] for g in test),
                "labeled": {key: len(v) for key, v in labeled.items()},
            },
        })
    label_counts: dict[str, int] = {}
    for label in labels:
        label_counts[label] = label_counts.get(label, 0) + 1
    return {
        "format": "cscpa-splits/1",
        "seed": seed,
        "num_folds": folds,
        "val_fraction": val_fraction,
        "labeled_fractions": [key for _, key in parsed],
        "num_images": len(ids),
        "labels": label_counts,
        "duplicates": {
            "exact_method": "sha256 of the decoded 8-bit greyscale pixels and the image size",
            "near_method": f"{HASH_SIDE}x{HASH_SIDE} difference hash of the greyscale image, Hamming distance",
            "near_threshold": duplicates.threshold,
            "exact": [sorted((ids[i] for i in g), key=natural_key) for g in duplicates.exact],
            "near": [[ids[i], ids[j], d] for i, j, d in duplicates.near],
        },
        "groups": sorted(
            (sorted((ids[i] for i in g), key=natural_key) for g in duplicates.groups if len(g) > 1),
            key=lambda g: natural_key(g[0]),
        ),
        "folds": out_folds,
    }


def dataset_greys(dataset: SegmentationDataset, progress: Callable[[Iterable[int]], Iterable[int]] | None = None
                  ) -> list[np.ndarray]:
    """Decode every image of ``dataset`` to (H, W) uint8 greyscale (what the hashes see)."""
    indices: Iterable[int] = range(len(dataset))
    if progress is not None:
        indices = progress(indices)
    return [dataset.load_grey(i) for i in indices]


def write_splits(splits: dict[str, Any], path: str | Path) -> None:
    """Write ``splits`` as JSON with sorted keys: equal splits give byte-identical files."""
    text = json.dumps(splits, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")


def validate_splits(splits: dict[str, Any], ids: Iterable[str] | None = None) -> None:
    """Raise ``ValueError`` unless ``splits`` keeps every invariant of the format.

    Checks: test folds partition the ids; per fold train, val and test are disjoint and cover
    everything; labeled ∪ unlabeled = train, disjoint; labeled sets nested; no duplicate group
    split across folds, train/val or labeled/unlabeled; with ``ids``, the same id set.
    """
    folds = splits["folds"]
    every = set().union(*(set(f["test"]) for f in folds))
    if sum(len(f["test"]) for f in folds) != len(every):
        raise ValueError("test folds overlap")
    if ids is not None and set(ids) != every:
        missing, extra = set(ids) - every, every - set(ids)
        raise ValueError(f"split ids differ from the dataset's: {len(missing)} missing, {len(extra)} unknown")
    groups = [set(g) for g in splits["groups"]]
    fractions = sorted(splits["labeled_fractions"], key=_parse_fraction)
    for k, fold in enumerate(folds):
        train, val, test = set(fold["train"]), set(fold["val"]), set(fold["test"])
        if train & val or train & test or val & test or (train | val | test) != every:
            raise ValueError(f"fold {k}: train, val and test must be disjoint and cover all ids")
        parts = {"train": train, "val": val, "test": test}
        previous: set[str] = set()
        for key in fractions:
            labeled, unlabeled = set(fold["labeled"][key]), set(fold["unlabeled"][key])
            if labeled & unlabeled or labeled | unlabeled != train:
                raise ValueError(f"fold {k}, {key}: labeled and unlabeled must partition train")
            if not previous <= labeled:
                raise ValueError(f"fold {k}: labeled sets are not nested at {key}")
            previous = labeled
            parts[f"labeled {key}"] = labeled
        for group in groups:
            for name, part in parts.items():
                if group & part and not group <= part:
                    raise ValueError(f"fold {k}: duplicate group {sorted(group)} is split by {name}")


def load_split(path: str | Path, fold: int, fraction: str) -> FoldSplit:
    """Read one fold at one labeled fraction from a split file, checking the file first."""
    splits = json.loads(Path(path).read_text(encoding="utf-8"))
    validate_splits(splits)
    folds = splits["folds"]
    if not 0 <= fold < len(folds):
        raise ValueError(f"fold must be in [0, {len(folds) - 1}] for {path}, got {fold}")
    entry = folds[fold]
    if fraction not in entry["labeled"]:
        raise ValueError(f"fraction must be one of {sorted(entry['labeled'])} in {path}, got {fraction!r} (a split "
                         f"file with it: python -m examples.make_splits ... --fractions {fraction})")
    return FoldSplit(entry["train"], entry["val"], entry["test"], entry["labeled"][fraction], entry["unlabeled"][fraction])
