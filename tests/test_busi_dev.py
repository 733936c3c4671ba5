"""The loader and the split generator on real BUSI (busi-dev: the odd-numbered half), when present.

Skipped when ``../shared/data/busi-dev`` does not exist next to the repository. Nothing from it
is copied or cached in the repository.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from examples.data.folders import BUSIDataset
from examples.data.registry import build_dataset
from examples.data.duplicates import find_duplicates
from examples.data.splits import dataset_greys, make_splits, validate_splits

BUSI_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "busi-dev"

pytestmark = pytest.mark.skipif(not BUSI_DEV.is_dir(), reason=f"{BUSI_DEV} is not here")


@pytest.fixture(scope="module")
def busi() -> BUSIDataset:
    ds = build_dataset(BUSI_DEV)
    assert isinstance(ds, BUSIDataset)
    return ds


def _or_of_files(paths: tuple[Path, ...]) -> np.ndarray:
    """An independent reading of the mask files: PIL's own conversion to RGB, any channel > 0."""
    merged: np.ndarray | None = None
    for path in paths:
        with Image.open(path) as image:
            layer = np.asarray((np.asarray(image.convert("RGB")) > 0).any(axis=-1))
        merged = layer if merged is None else merged | layer
    assert merged is not None
    return merged


def test_324_abnormal_cases(busi: BUSIDataset) -> None:
    assert len(busi) == 324
    assert busi.label_counts() == {"benign": 219, "malignant": 105}
    assert len(build_dataset(BUSI_DEV, include_normal=True)) == 336


def test_multi_lesion_masks_are_merged(busi: BUSIDataset) -> None:
    multi = [(item_id, masks) for item_id, _, masks in busi.records() if len(masks) > 1]
    assert len(multi) >= 9  # 9 in this half: 8 benign (one with _mask_2) and 1 malignant
    assert any(len(masks) == 3 for _, masks in multi)
    for item_id, masks in multi:
        loaded = busi.load(busi.index_of(item_id)).mask.numpy().astype(bool)
        np.testing.assert_array_equal(loaded, _or_of_files(masks), err_msg=item_id)
        # every extra file adds lesion pixels the main mask does not have
        assert loaded.sum() > _or_of_files(masks[:1]).sum(), item_id


def test_every_case_loads_with_a_nonempty_binary_mask(busi: BUSIDataset) -> None:
    for i in range(len(busi)):
        raw = busi.load(i)
        assert raw.image.shape[1:] == raw.mask.shape and raw.mask.any(), raw.id
        assert set(np.unique(raw.mask.numpy()).tolist()) <= {0, 1}


def test_no_duplicate_group_is_split(busi: BUSIDataset) -> None:
    dups = find_duplicates(dataset_greys(busi))
    named = [sorted(busi.ids[i] for i in g) for g in dups.exact]
    assert ["benign/benign (433).png", "malignant/malignant (145).png"] in named
    splits = make_splits(busi.ids, busi.labels, dups, folds=5, seed=0)
    validate_splits(splits, busi.ids)
    for group in splits["groups"]:
        folds = {k for k, f in enumerate(splits["folds"]) if set(group) & set(f["test"])}
        assert len(folds) == 1, group
    assert len(splits["groups"]) >= 20  # busi-dev: 27 groups at the default threshold
