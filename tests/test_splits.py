"""Split files: duplicate groups, stratified folds, nested labeled sets, determinism, the CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.data.registry import build_dataset
from examples.data.duplicates import NEAR_THRESHOLD, Duplicates, difference_hash, find_duplicates, pixel_hash
from examples.data.splits import FoldSplit, dataset_greys, load_split, make_splits, validate_splits, write_splits
from tests._data_trees import make_busi_tree, smooth_image

ROOT = Path(__file__).resolve().parents[1]


def _hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


# --- hashes and duplicate groups ------------------------------------------------------------


def test_pixel_hash_sees_pixels_not_bytes(tmp_path: Path) -> None:
    grey = smooth_image(0, 30, 40)
    Image.fromarray(grey).save(tmp_path / "a.png", compress_level=1)
    Image.fromarray(grey).save(tmp_path / "b.png", compress_level=9)
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
    decoded = [np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "b.png")]
    assert pixel_hash(decoded[0]) == pixel_hash(decoded[1])
    changed = grey.copy()
    changed[0, 0] ^= 1
    assert pixel_hash(changed) != pixel_hash(grey)
    assert pixel_hash(grey.reshape(40, 30)) != pixel_hash(grey)  # the size is part of the hash


def test_difference_hash_is_stable_under_resizing_and_brightening() -> None:
    grey = smooth_image(1, 120, 160)
    code = difference_hash(grey)
    assert code.dtype == np.uint8 and code.shape == (32,)  # 256 bits
    smaller = np.asarray(Image.fromarray(grey).resize((130, 97), Image.Resampling.BILINEAR))
    brighter = np.clip(grey.astype(int) + 5, 0, 255).astype(np.uint8)
    assert _hamming(code, difference_hash(smaller)) <= NEAR_THRESHOLD
    assert _hamming(code, difference_hash(brighter)) <= NEAR_THRESHOLD
    unrelated = [_hamming(code, difference_hash(smooth_image(s, 120, 160))) for s in range(2, 12)]
    assert min(unrelated) > NEAR_THRESHOLD


def test_find_duplicates_groups_exact_and_near_transitively() -> None:
    a, b, c = smooth_image(10, 50, 60), smooth_image(11, 50, 60), smooth_image(12, 40, 40)
    near_a = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)
    rescaled_a = np.asarray(Image.fromarray(a).resize((66, 55), Image.Resampling.BICUBIC))
    greys = [a, b, a.copy(), c, near_a, rescaled_a]
    dups = find_duplicates(greys)
    assert dups.exact == [[0, 2]]
    assert dups.groups == [[0, 2, 4, 5], [1], [3]]
    assert all(i < j and d <= NEAR_THRESHOLD for i, j, d in dups.near)
    assert (0, 2, 0) in dups.near
    off = find_duplicates(greys, threshold=-1)  # exact only
    assert off.near == [] and off.groups == [[0, 2], [1], [3], [4], [5]]


# --- the split dictionary -----------------------------------------------------------------


def _synthetic(count: int = 103, seed: int = 0) -> tuple[list[str], list[str], Duplicates]:
    """Ids with 2/3 benign, 1/3 malignant, and a few duplicate groups, one across classes."""
    ids = [f"{'benign' if i % 3 else 'malignant'}/{i}.png" for i in range(count)]
    labels = [i.split("/")[0] for i in ids]
    greys = [smooth_image(seed * 1000 + i, 48, 48) for i in range(count)]
    for a, b in ((0, 1), (4, 5), (5, 7), (10, 40), (22, 23)):
        if b < count:
            greys[b] = greys[a].copy()
    if count > 61:
        greys[60] = np.clip(greys[61].astype(int) + 2, 0, 255).astype(np.uint8)
    return ids, labels, find_duplicates(greys)


def test_split_invariants_and_counts() -> None:
    ids, labels, dups = _synthetic()
    assert sorted(len(g) for g in dups.groups if len(g) > 1) == [2, 2, 2, 2, 3]
    assert dups.exact == [[0, 1], [4, 5, 7], [10, 40], [22, 23]]
    splits = make_splits(ids, labels, dups, folds=5, seed=0, val_fraction=0.1)
    validate_splits(splits, ids)  # partition, disjointness, nesting, groups kept whole
    assert splits["seed"] == 0 and splits["num_folds"] == 5 and len(splits["folds"]) == 5
    assert splits["labeled_fractions"] == ["1/8", "1/4", "1/2"]
    assert splits["duplicates"]["near_threshold"] == NEAR_THRESHOLD
    assert splits["groups"] == [  # only groups of size > 1, natural order, cross-class ones included
        ["benign/1.png", "malignant/0.png"], ["benign/4.png", "benign/5.png", "benign/7.png"],
        ["benign/10.png", "benign/40.png"], ["benign/22.png", "benign/23.png"], ["benign/61.png", "malignant/60.png"],
    ]
    tests = [f["test"] for f in splits["folds"]]
    assert sorted(len(t) for t in tests) in ([20, 20, 21, 21, 21], [20, 20, 20, 21, 22], [19, 21, 21, 21, 21])
    for fold in splits["folds"]:
        n = len(fold["train"]) + len(fold["val"])  # the training fold before val is carved out
        assert len(fold["val"]) in (round(0.1 * n), round(0.1 * n) - 1)  # groups may cost one
        for key, value in (("1/8", 8), ("1/4", 4), ("1/2", 2)):
            assert n // value - 1 <= len(fold["labeled"][key]) <= n // value
        assert set(fold["labeled"]["1/8"]) <= set(fold["labeled"]["1/4"]) <= set(fold["labeled"]["1/2"])
        for key in ("1/8", "1/4", "1/2"):
            assert set(fold["labeled"][key]) | set(fold["unlabeled"][key]) == set(fold["train"])
        assert fold["counts"]["test"] == len(fold["test"])


def test_folds_are_stratified() -> None:
    ids, labels, dups = _synthetic(150)
    splits = make_splits(ids, labels, dups, folds=5, seed=1)
    share = labels.count("malignant") / len(labels)
    for fold in splits["folds"]:
        for part in ("test", "train"):
            malignant = sum(i.startswith("malignant") for i in fold[part])
            assert abs(malignant - share * len(fold[part])) <= 3, part
        labeled = fold["labeled"]["1/8"]
        assert abs(sum(i.startswith("malignant") for i in labeled) - share * len(labeled)) <= 2


def test_cross_class_group_goes_to_one_fold() -> None:
    ids, labels, dups = _synthetic()
    splits = make_splits(ids, labels, dups, folds=4, seed=2)
    group = {"malignant/0.png", "benign/1.png"}
    assert sum(bool(group & set(f["test"])) for f in splits["folds"]) == 1
    for fold in splits["folds"]:
        for part in ("train", "val", "test"):
            assert not group & set(fold[part]) or group <= set(fold[part])


def test_deterministic_and_seeded(tmp_path: Path) -> None:
    ids, labels, dups = _synthetic()
    first = make_splits(ids, labels, dups, seed=7)
    assert make_splits(ids, labels, dups, seed=7) == first
    assert make_splits(ids, labels, dups, seed=8)["folds"] != first["folds"]
    write_splits(first, tmp_path / "a.json")
    write_splits(make_splits(ids, labels, dups, seed=7), tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()


def test_no_validation_split() -> None:
    ids, labels, dups = _synthetic()
    splits = make_splits(ids, labels, dups, val_fraction=0.0, fractions=["1/3"])
    validate_splits(splits, ids)
    assert all(f["val"] == [] for f in splits["folds"])
    assert splits["labeled_fractions"] == ["1/3"]


def test_bad_arguments() -> None:
    ids, labels, dups = _synthetic(20)
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        make_splits(ids, labels, dups, folds=1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\)"):
        make_splits(ids, labels, dups, val_fraction=1.0)
    with pytest.raises(ValueError, match="not a fraction like"):
        make_splits(ids, labels, dups, fractions=["half"])
    with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
        make_splits(ids, labels, dups, fractions=["3/2"])
    with pytest.raises(ValueError, match="cannot fill 30 folds"):
        make_splits(ids, labels, dups, folds=30)
    with pytest.raises(ValueError, match="must describe the same items"):
        make_splits(ids[:-1], labels[:-1], dups)


def test_validate_splits_catches_broken_files() -> None:
    ids, labels, dups = _synthetic()
    good = make_splits(ids, labels, dups)
    broken = copy.deepcopy(good)
    moved = broken["folds"][0]["test"].pop()
    with pytest.raises(ValueError, match="cover all ids"):
        validate_splits(broken)
    broken = copy.deepcopy(good)
    fold = broken["folds"][0]
    group = next(g for g in broken["groups"] if set(g) <= set(fold["train"]))
    fold["train"].remove(group[0])
    fold["val"].append(group[0])
    for key in fold["labeled"]:
        for part in (fold["labeled"][key], fold["unlabeled"][key]):
            if group[0] in part:
                part.remove(group[0])
    with pytest.raises(ValueError, match="duplicate group .* is split by"):
        validate_splits(broken)
    broken = copy.deepcopy(good)
    fold = broken["folds"][1]
    fold["labeled"]["1/8"].append(fold["unlabeled"]["1/4"][0])
    with pytest.raises(ValueError, match="labeled and unlabeled must partition train|not nested"):
        validate_splits(broken)
    with pytest.raises(ValueError, match="1 missing"):
        validate_splits(good, ids + ["benign/extra.png"])
    assert moved


def test_load_split(tmp_path: Path) -> None:
    ids, labels, dups = _synthetic()
    splits = make_splits(ids, labels, dups)
    write_splits(splits, tmp_path / "s.json")
    split = load_split(tmp_path / "s.json", 2, "1/4")
    assert isinstance(split, FoldSplit)
    assert split.test == splits["folds"][2]["test"] and split.labeled == splits["folds"][2]["labeled"]["1/4"]
    with pytest.raises(ValueError, match=r"fold must be in \[0, 4\]"):
        load_split(tmp_path / "s.json", 5, "1/4")
    with pytest.raises(ValueError, match="fraction must be one of"):
        load_split(tmp_path / "s.json", 0, "1/16")


def test_dataset_greys_match_the_decoded_images(tmp_path: Path) -> None:
    make_busi_tree(tmp_path)
    ds = build_dataset(tmp_path)
    greys = dataset_greys(ds)
    assert len(greys) == len(ds)
    for i, grey in enumerate(greys):
        np.testing.assert_array_equal(grey, ds.load(i).image[0].numpy())
    dups = find_duplicates(greys)
    named = [[ds.ids[i] for i in g] for g in dups.groups if len(g) > 1]
    # benign (2) and malignant (1) are byte-identical; malignant (2) is benign (1) brightened
    assert named == [["benign/benign (1).png", "malignant/malignant (2).png"],
                     ["benign/benign (2).png", "malignant/malignant (1).png"]]


# --- the command line ------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "examples.make_splits", *args, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_cli_writes_a_byte_identical_file_twice(tmp_path: Path) -> None:
    data = tmp_path / "busi"
    make_busi_tree(data)
    for name in ("a.json", "b.json"):
        result = _cli(str(data), "--folds", "2", "--seed", "0", "--out", str(tmp_path / name))
        assert result.returncode == 0, result.stderr
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    splits = json.loads((tmp_path / "a.json").read_text())
    validate_splits(splits, build_dataset(data).ids)
    assert splits["data"] == {"include_normal": False, "name": "busi"}
    assert "benign/benign (2).png | malignant/malignant (1).png" in result.stdout
    assert splits["duplicates"]["exact"] == [["benign/benign (2).png", "malignant/malignant (1).png"]]


def test_cli_phantom(tmp_path: Path) -> None:
    result = _cli("phantom", "--count", "40", "--phantom-size", "64", "--out", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr
    splits = json.loads((tmp_path / "p.json").read_text())
    assert splits["num_images"] == 40 and splits["data"]["name"] == "phantom"
    validate_splits(splits, [f"phantom/{i:06d}" for i in range(40)])
    assert set(splits["labels"]) <= {"lesions=0", "lesions=1", "lesions=2", "lesions=3"}


def test_cli_phantom_without_lesion_free_images(tmp_path: Path) -> None:
    result = _cli("phantom", "--count", "40", "--phantom-size", "64", "--no-lesion-free", "--out",
                  str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr
    splits = json.loads((tmp_path / "p.json").read_text())
    kept = build_dataset("phantom", phantom_count=40, phantom_size=64, phantom_lesion_free=False).ids
    assert splits["data"]["lesion_free"] is False and splits["num_images"] == len(kept) < 40
    validate_splits(splits, kept)
    assert "lesions=0" not in splits["labels"]


def test_cli_names_the_bad_folder(tmp_path: Path) -> None:
    result = _cli(str(tmp_path), "--out", str(tmp_path / "x.json"))
    assert result.returncode == 1
    assert f"{tmp_path.name} is not a dataset" in result.stderr
    assert not (tmp_path / "x.json").exists()
