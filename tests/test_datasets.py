"""BUSI and images/+masks/ folders: every quirk of real BUSI, every bad input, and the transforms."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import tv_tensors

from examples.data.folders import BUSIDataset, ImageMaskFolder
from examples.data.images import DataError, read_image, read_mask
from examples.data.registry import build_dataset
from examples.data.samples import IGNORE_INDEX, EvalSample, RawSample, Sample, collate_samples
from examples.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EvalTransform,
    NormalizeTransform,
    RandomScale,
    TrainTransform,
    denormalize,
    normalize,
)
from tests._data_trees import (
    make_busi_tree,
    make_paired_tree,
    make_udiat_tree,
    save_mask,
    save_rgb,
    smooth_image,
    truncate,
)


@pytest.fixture()
def busi(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    root = tmp_path / "busi"
    return root, make_busi_tree(root)


# --- BUSI layout: the quirks ----------------------------------------------------------------


def test_busi_abnormal_only_by_default_in_natural_order(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    ds = build_dataset(root)
    assert isinstance(ds, BUSIDataset)
    assert ds.ids == [
        "benign/benign (1).png", "benign/benign (2).png", "benign/benign (3).png", "benign/benign (10).png",
        "malignant/malignant (1).png", "malignant/malignant (2).png", "malignant/malignant (3).png",
    ]
    assert ds.labels == ["benign"] * 4 + ["malignant"] * 3
    with_normal = build_dataset(root, include_normal=True)
    assert len(with_normal) == 8 and with_normal.ids[-1] == "normal/normal (1).png"
    assert with_normal.label_counts() == {"benign": 4, "malignant": 3, "normal": 1}


def test_busi_masks_are_merged_and_binarised_from_every_mode(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, expected = busi
    ds = BUSIDataset(root, include_normal=True)
    for i, item_id in enumerate(ds.ids):
        raw = ds.load(i)
        assert raw.id == item_id
        assert raw.mask.dtype == torch.uint8 and isinstance(raw.mask, tv_tensors.Mask)
        np.testing.assert_array_equal(raw.mask.numpy().astype(bool), expected[item_id], err_msg=item_id)
    # the three files of benign (2) are L, RGB and RGBA; each alone is a strict subset
    record = dict((r[0], r[2]) for r in ds.records())["benign/benign (2).png"]
    assert [p.name for p in record] == ["benign (2)_mask.png", "benign (2)_mask_1.png", "benign (2)_mask_2.png"]
    assert all(read_mask(p).sum() < expected["benign/benign (2).png"].sum() for p in record)


def test_busi_images_become_three_equal_grey_channels(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    ds = build_dataset(root)
    overlay = ds.load(ds.index_of("benign/benign (3).png"))
    assert overlay.image.shape == (3, 37, 61) and overlay.image.dtype == torch.uint8
    assert torch.equal(overlay.image[0], overlay.image[1]) and torch.equal(overlay.image[1], overlay.image[2])
    # the yellow caliper line becomes its luma, 0.299 R + 0.587 G + 0.114 B
    luma = round(0.299 * 255 + 0.587 * 255 + 0.114 * 0)
    assert abs(int(overlay.image[0, 11, 20]) - luma) <= 1
    plain = ds.load(0)
    source = np.asarray(Image.open(root / "benign" / "benign (1).png"))[..., 0]
    np.testing.assert_array_equal(plain.image[0].numpy(), source)


def test_item_is_normalised_image_long_mask_and_id(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, expected = busi
    ds = build_dataset(root)
    sample = ds[1]
    assert isinstance(sample, Sample)
    assert sample.image.dtype == torch.float32 and sample.image.shape == (3, 44, 52)
    assert sample.mask.dtype == torch.int64 and set(sample.mask.unique().tolist()) <= {0, 1}
    assert sample.id == "benign/benign (2).png"
    np.testing.assert_array_equal(sample.mask.numpy(), expected[sample.id].astype(np.int64))
    torch.testing.assert_close(sample.image, normalize(ds.load(1).image.as_subclass(torch.Tensor)))


def test_subset_keeps_order_and_rejects_unknown_ids(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    ds = build_dataset(root)
    sub = ds.subset(["malignant/malignant (3).png", "benign/benign (1).png"])
    assert sub.ids == ["malignant/malignant (3).png", "benign/benign (1).png"]
    assert sub.labels == ["malignant", "benign"] and len(ds) == 7
    assert sub[0].id == "malignant/malignant (3).png"
    with pytest.raises(KeyError, match=r"benign \(99\)\.png.*another data directory"):
        ds.subset(["benign/benign (99).png"])
    with pytest.raises(ValueError, match="unique"):
        ds.subset(["benign/benign (1).png", "benign/benign (1).png"])
    evaluated = sub.with_transform(EvalTransform(16))
    assert isinstance(evaluated[0], EvalSample) and isinstance(sub[0], Sample)


# --- images/ + masks/ (UDIAT) ------------------------------------------------------------------


@pytest.mark.parametrize(("images", "masks"), [("images", "masks"), ("original", "GT")])
def test_paired_layout(tmp_path: Path, images: str, masks: str) -> None:
    expected = make_paired_tree(tmp_path, images, masks)
    ds = build_dataset(tmp_path)
    assert isinstance(ds, ImageMaskFolder)
    assert ds.ids == sorted(expected) and set(ds.labels) == {"all"}
    for i, item_id in enumerate(ds.ids):
        np.testing.assert_array_equal(ds.load(i).mask.numpy().astype(bool), expected[item_id])


def test_udiat_dataset_b_layout(tmp_path: Path) -> None:
    """UDIAT's names: original/000001.png with GT/000001.png (lesion 255), as docs/data.md states."""
    root = tmp_path / "UDIAT_Dataset_B"
    expected = make_udiat_tree(root, count=11)
    ds = build_dataset(root)
    assert isinstance(ds, ImageMaskFolder) and (ds.images_dir, ds.masks_dir) == ("original", "GT")
    assert "original/ + GT/" in repr(ds)
    assert ds.ids == [f"original/{i:06d}.png" for i in range(1, 12)] and set(ds.labels) == {"all"}
    for i, item_id in enumerate(ds.ids):
        item = ds.load(i)
        np.testing.assert_array_equal(item.mask.numpy().astype(bool), expected[item_id])
        grey = np.array(Image.open(root / item_id))
        assert all(torch.equal(item.image[c], torch.from_numpy(grey)) for c in range(3))
    # a mask stored with 1 for lesion, or under an upper-case extension, reads the same
    mask = expected["original/000002.png"]
    (root / "GT" / "000002.png").unlink()
    Image.fromarray(mask.astype(np.uint8)).save(root / "GT" / "000002.PNG", format="PNG")
    again = build_dataset(root)
    assert again.ids == ds.ids
    np.testing.assert_array_equal(again.load(1).mask.numpy().astype(bool), mask)
    # the Kaggle copy nests the dataset one level down: the error points at it
    nested = tmp_path / "download"
    shutil.copytree(root, nested / "UDIAT_Dataset_B")
    with pytest.raises(DataError, match=r"did you mean .*download/UDIAT_Dataset_B\?"):
        build_dataset(nested)


def test_paired_layout_explicit_folder_names(tmp_path: Path) -> None:
    make_paired_tree(tmp_path, "scans", "labels")
    with pytest.raises(DataError, match="is not a dataset"):
        build_dataset(tmp_path)
    assert len(ImageMaskFolder(tmp_path, images="scans", masks="labels")) == 4


# --- bad input: every error names the file ------------------------------------------------------


def test_not_a_dataset_names_the_folder(tmp_path: Path) -> None:
    (tmp_path / "stuff").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path.name} is not a dataset.*benign/.*images/ \+ masks/"):
        build_dataset(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        build_dataset(tmp_path / "missing")
    with pytest.raises(DataError, match="is not a dataset"):
        BUSIDataset(tmp_path)


def test_not_a_dataset_suggests_the_inner_folder(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi  # like Kaggle's zip: the dataset sits one level down
    with pytest.raises(DataError, match=r"did you mean .*busi\?"):
        build_dataset(root.parent)


def test_image_without_mask(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    (root / "benign" / "benign (3)_mask.png").unlink()
    with pytest.raises(DataError, match=r"image .*benign \(3\)\.png has no mask"):
        build_dataset(root)


def test_mask_without_image(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    (root / "malignant" / "malignant (3).png").unlink()
    with pytest.raises(DataError, match=r"mask .*malignant \(3\)_mask\.png has no image"):
        build_dataset(root)


def test_paired_layout_unpaired_files(tmp_path: Path) -> None:
    make_paired_tree(tmp_path)
    (tmp_path / "masks" / "000002.png").unlink()
    with pytest.raises(DataError, match=r"image .*000002\.png has no mask"):
        build_dataset(tmp_path)
    shutil.copyfile(tmp_path / "masks" / "000001.png", tmp_path / "masks" / "000002.png")
    shutil.copyfile(tmp_path / "masks" / "000001.png", tmp_path / "masks" / "extra.png")
    with pytest.raises(DataError, match=r"mask .*extra\.png has no image"):
        build_dataset(tmp_path)


def test_corrupt_png_fails_when_the_dataset_is_built(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    (root / "benign" / "benign (10).png").write_bytes(b"this is not a png at all")
    with pytest.raises(DataError, match=r"cannot read .*benign \(10\)\.png"):
        build_dataset(root)


def test_truncated_png_fails_on_load_or_with_verify(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    truncate(root / "malignant" / "malignant (2)_mask.png")
    ds = build_dataset(root)  # the header still reads
    with pytest.raises(DataError, match=r"cannot decode .*malignant \(2\)_mask\.png"):
        ds.load(ds.index_of("malignant/malignant (2).png"))
    with pytest.raises(DataError, match=r"cannot decode .*malignant \(2\)_mask\.png"):
        build_dataset(root, verify=True)


def test_size_mismatch_names_both_files(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    save_mask(np.zeros((44, 51), dtype=bool), root / "benign" / "benign (2)_mask_1.png", "RGB")
    with pytest.raises(DataError, match=r"mask .*benign \(2\)_mask_1\.png is 51x44 .*image .*benign \(2\)\.png is 52x44"):
        build_dataset(root)


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "benign").mkdir()
    (tmp_path / "malignant").mkdir()
    with pytest.raises(DataError, match=rf"{tmp_path.name} holds no usable image/mask pairs"):
        build_dataset(tmp_path)
    (tmp_path / "normal").mkdir()
    save_rgb(smooth_image(0, 20, 20), tmp_path / "normal" / "normal (1).png")
    save_mask(np.zeros((20, 20), dtype=bool), tmp_path / "normal" / "normal (1)_mask.png", "RGB")
    with pytest.raises(DataError, match="empty dataset"):
        build_dataset(tmp_path)  # normal/ is not loaded by default
    assert len(build_dataset(tmp_path, include_normal=True)) == 1


def test_include_normal_without_normal_folder(tmp_path: Path) -> None:
    make_busi_tree(tmp_path)
    shutil.rmtree(tmp_path / "normal")
    with pytest.raises(DataError, match=r"include_normal=True but .*normal is not a folder"):
        build_dataset(tmp_path, include_normal=True)


def test_skip_bad_warns_once_per_file_and_keeps_the_rest(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    (root / "benign" / "benign (3)_mask.png").unlink()  # image without mask
    truncate(root / "malignant" / "malignant (2).png")  # only a full decode finds it
    (root / "benign" / "benign (7)_mask.png").write_bytes((root / "benign" / "benign (1)_mask.png").read_bytes())
    with pytest.warns(UserWarning) as record:
        ds = build_dataset(root, skip_bad=True)
    messages = [str(w.message) for w in record]
    assert len(messages) == 3
    assert any("benign (3).png" in m and "no mask" in m for m in messages)
    assert any("malignant (2).png" in m and "cannot decode" in m for m in messages)
    assert any("benign (7)_mask.png" in m and "no image" in m for m in messages)
    assert "benign/benign (3).png" not in ds.ids and "malignant/malignant (2).png" not in ds.ids
    assert len(ds) == 5


def test_skip_bad_on_a_clean_tree_is_silent(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(build_dataset(root, skip_bad=True, include_normal=True)) == 8


def test_read_mask_modes(tmp_path: Path) -> None:
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:3, 2:5] = True
    for mode in ("1", "L", "RGB", "RGBA"):
        save_mask(mask, tmp_path / f"m_{mode}.png", mode)
        np.testing.assert_array_equal(read_mask(tmp_path / f"m_{mode}.png"), mask, err_msg=mode)
    # a colour that is not white: any channel > 0 counts
    rgb = np.zeros((6, 7, 3), dtype=np.uint8)
    rgb[mask] = (0, 0, 1)
    Image.fromarray(rgb).save(tmp_path / "blue.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "blue.png"), mask)
    # transparent pixels are background even when their colour is not black
    rgba = np.full((6, 7, 4), 255, dtype=np.uint8)
    rgba[..., 3] = mask * 255
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "alpha.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "alpha.png"), mask)
    # a palette whose index 0 is white: the colours decide, not the indices
    palette = Image.fromarray((~mask).astype(np.uint8), mode="P")
    palette.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
    palette.save(tmp_path / "palette.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "palette.png"), ~mask)


def test_read_image_16_bit(tmp_path: Path) -> None:
    wide = (np.arange(12, dtype=np.uint16).reshape(3, 4) * 5000).astype(np.uint16)
    Image.fromarray(wide).save(tmp_path / "wide.png")
    np.testing.assert_array_equal(read_image(tmp_path / "wide.png"), np.round(wide / 257).astype(np.uint8))


# --- transforms ---------------------------------------------------------------------------------


def _blocks(height: int, width: int) -> RawSample:
    """Image bright exactly where the mask is 1, in big blocks, so alignment is checkable."""
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[: height // 2, : width // 3] = 1
    mask[height // 2 :, width // 2 :] = 1
    image = torch.from_numpy(np.where(mask == 1, 220, 30).astype(np.uint8)).repeat(3, 1, 1)
    return RawSample(tv_tensors.Image(image), tv_tensors.Mask(torch.from_numpy(mask)), "blocks")


def test_train_transform_moves_image_and_mask_together() -> None:
    torch.manual_seed(0)
    transform = TrainTransform(crop=48)
    for _ in range(20):
        sample = transform(_blocks(40, 60))
        assert sample.image.shape == (3, 48, 48) and sample.mask.shape == (48, 48)
        assert sample.mask.dtype == torch.int64
        grey = denormalize(sample.image)[0].int()
        valid = sample.mask != IGNORE_INDEX
        agree = ((grey > 125) == (sample.mask == 1))[valid].float().mean()
        assert agree > 0.95  # only resampled block edges may disagree


def test_train_transform_pads_image_with_zero_and_mask_with_ignore() -> None:
    transform = TrainTransform(crop=64, scale_range=(1.0, 1.0), flip=0.0)
    sample = transform(_blocks(40, 60))
    padded = sample.mask == IGNORE_INDEX
    assert int(padded.sum()) == 64 * 64 - 40 * 60
    assert torch.all(sample.image[:, padded] == 0)
    assert set(sample.mask[~padded].unique().tolist()) == {0, 1}


def test_train_transform_scale_and_flip() -> None:
    raw = _blocks(40, 60)
    flipped = TrainTransform(crop=(40, 60), scale_range=(1.0, 1.0), flip=1.0)(raw)
    assert torch.equal(flipped.mask, raw.mask.flip(-1).long())
    torch.manual_seed(1)
    sizes = set()
    scale = RandomScale((0.5, 2.0))
    for _ in range(50):
        params = scale.make_params([raw.image])
        sizes.add(params["size"][0])
    assert min(sizes) >= 20 and max(sizes) <= 80 and len(sizes) > 10  # 40 x [0.5, 2]


def test_eval_transform_keeps_the_full_resolution_mask() -> None:
    raw = _blocks(40, 60)
    sample = EvalTransform(32)(raw)
    assert sample.image.shape == (3, 32, 32) and sample.mask.shape == (32, 32)
    assert torch.equal(sample.full_mask, raw.mask.long())
    same = EvalTransform(None)(raw)
    torch.testing.assert_close(same.image, NormalizeTransform()(raw).image)


def test_normalisation_constants_and_round_trip() -> None:
    image = torch.randint(0, 256, (3, 5, 4), dtype=torch.uint8)
    out = normalize(image)
    expected = (image.float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(out, expected)
    assert torch.equal(denormalize(out), image)
    with pytest.raises(ValueError, match="uint8"):
        normalize(image.float())


def test_transform_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="crop must be"):
        TrainTransform(crop=0)
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransform(crop=8, scale_range=(2.0, 1.0))
    with pytest.raises(ValueError, match="flip"):
        TrainTransform(crop=8, flip=1.5)
    with pytest.raises(ValueError, match="size must be"):
        EvalTransform((3, 4, 5))


def test_dataloader_batches(busi: tuple[Path, dict[str, np.ndarray]]) -> None:
    root, _ = busi
    train = build_dataset(root, transform=TrainTransform(crop=32))
    batch = next(iter(DataLoader(train, batch_size=4, shuffle=False)))  # default collate works
    assert batch.image.shape == (4, 3, 32, 32) and batch.mask.shape == (4, 32, 32) and len(batch.id) == 4
    evaluation = build_dataset(root, transform=EvalTransform(24))
    loader = DataLoader(evaluation, batch_size=3, collate_fn=collate_samples)
    first = next(iter(loader))
    assert isinstance(first, EvalSample) and first.image.shape == (3, 3, 24, 24)
    assert [tuple(m.shape) for m in first.full_mask] == [(40, 50), (44, 52), (37, 61)]
    with pytest.raises(ValueError, match="empty batch"):
        collate_samples([])
