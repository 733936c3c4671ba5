"""The synthetic phantom: deterministic, fast, and shaped like breast ultrasound."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from examples.data.registry import build_dataset
from examples.data.phantom_dataset import PhantomDataset
from examples.data.phantom import (
    LESION_COUNT_PROBS,
    count_lesions,
    phantom_seed,
    rayleigh_speckle,
    render_phantom,
)
from examples.data.samples import Sample
from examples.data.transforms import TrainTransform


def test_item_format_matches_the_folder_datasets() -> None:
    ds = build_dataset("phantom", phantom_count=5, phantom_size=64)
    assert isinstance(ds, PhantomDataset) and len(ds) == 5
    assert ds.ids == [f"phantom/{i:06d}" for i in range(5)]
    raw = ds.load(3)
    assert raw.image.shape == (3, 64, 64) and raw.image.dtype == torch.uint8
    assert torch.equal(raw.image[0], raw.image[2])
    assert raw.mask.shape == (64, 64) and set(raw.mask.unique().tolist()) <= {0, 1}
    sample = ds[3]
    assert isinstance(sample, Sample) and sample.image.dtype == torch.float32 and sample.mask.dtype == torch.int64
    assert ds.with_transform(TrainTransform(crop=48))[0].image.shape == (3, 48, 48)


def test_deterministic_given_seed_and_index() -> None:
    a, b = PhantomDataset(6, size=64, seed=3), PhantomDataset(6, size=64, seed=3)
    for i in range(6):
        assert torch.equal(a.load(i).image, b.load(i).image) and torch.equal(a.load(i).mask, b.load(i).mask)
    # an image depends on its index only, not on what was generated before or on the count
    assert torch.equal(PhantomDataset(50, size=64, seed=3).load(4).image, a.load(4).image)
    assert torch.equal(a.subset(["phantom/000004"]).load(0).image, a.load(4).image)
    other = PhantomDataset(6, size=64, seed=4)
    assert not torch.equal(other.load(0).image, a.load(0).image)
    assert len({phantom_seed(s, i) for s in range(20) for i in range(20)}) == 400


def test_cached_items_equal_rendered_ones_and_cannot_be_altered_through_a_load() -> None:
    cached, plain = PhantomDataset(5, size=64, seed=2), PhantomDataset(5, size=64, seed=2, cache=False)
    first = cached.load(3)
    assert cached._rendered is not None and list(cached._rendered) == [3]
    assert plain._rendered is None
    first.image.zero_()  # a transform working in place must not reach the cache
    first.mask.fill_(1)
    again, rendered = cached.load(3), plain.load(3)
    assert torch.equal(again.image, rendered.image) and torch.equal(again.mask, rendered.mask)
    assert again.image.any() and not again.mask.all()
    part = cached.subset(["phantom/000001"])  # a subset fills and reads its parent's cache
    assert torch.equal(part.load(0).image, plain.load(1).image) and sorted(cached._rendered) == [1, 3]
    with pytest.raises(TypeError, match="cache must be a bool, got int"):
        PhantomDataset(4, size=64, cache=1)  # type: ignore[arg-type]


def test_lesion_counts_cover_zero_to_three_and_match_the_mask() -> None:
    ds = PhantomDataset(200, size=64)
    counts = [ds.num_lesions(i) for i in range(len(ds))]
    assert set(counts) == {0, 1, 2, 3}
    assert ds.labels == [f"lesions={c}" for c in counts]
    # the empty-lesion case exists, near its probability
    assert abs(counts.count(0) / len(counts) - LESION_COUNT_PROBS[0]) < 0.08
    for i in range(20):
        rendered = ds.render(i)
        assert rendered.num_lesions == counts[i] == count_lesions(phantom_seed(0, i), size=64)
        assert bool(rendered.mask.any()) == (counts[i] > 0)


def test_lesion_free_false_leaves_out_exactly_the_empty_images() -> None:
    full = PhantomDataset(60, size=64)
    lesions = PhantomDataset(60, size=64, lesion_free=False)
    empty = {full.ids[i] for i in range(len(full)) if full.num_lesions(i) == 0}
    assert empty and lesions.ids == [i for i in full.ids if i not in empty]
    assert "lesions=0" not in lesions.labels and len(lesions) < len(full)
    for i in (0, len(lesions) - 1):  # the same image under the same id, and it has a lesion
        same = full.ids.index(lesions.ids[i])
        assert torch.equal(lesions.load(i).image, full.load(same).image)
        assert lesions.num_lesions(i) == full.num_lesions(same) > 0 and bool(lesions.load(i).mask.any())
    assert lesions.subset(lesions.ids[:2]).ids == lesions.ids[:2]
    assert "lesion-free left out" in repr(lesions) and "lesion-free" not in repr(full)
    assert build_dataset("phantom", phantom_count=60, phantom_size=64, phantom_lesion_free=False).ids == lesions.ids
    seed = next(s for s in range(100) if count_lesions(phantom_seed(s, 0), size=64) == 0)
    with pytest.raises(TypeError, match="lesion_free must be a bool, got str"):
        PhantomDataset(4, size=64, lesion_free="no")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="none of the phantom's 1 images has a lesion"):
        PhantomDataset(1, size=64, seed=seed, lesion_free=False)


def _components(mask: np.ndarray) -> int:
    """4-connected components of a small bool mask (flood fill)."""
    seen = np.zeros_like(mask)
    found = 0
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        found += 1
        stack = [start]
        while stack:
            y, x = stack.pop()
            if 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and mask[y, x] and not seen[y, x]:
                seen[y, x] = True
                stack += [(y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)]
    return found


def test_lesions_are_separate_and_vary_widely_in_scale() -> None:
    ds = PhantomDataset(60, size=128)
    areas = []
    for i in range(len(ds)):
        rendered = ds.render(i)
        mask = rendered.mask.numpy()
        assert _components(mask) >= rendered.num_lesions  # non-overlapping (spicules may split)
        if rendered.num_lesions == 1:
            areas.append(mask.mean())
    assert max(areas) / min(areas) > 20  # r0 spans 3%..22% of the side


def _lesion_minus_ring(rendered) -> float | None:  # type: ignore[no-untyped-def]
    """Mean grey level inside the lesions minus that of a ring 3..8 px outside them (None: no lesion)."""
    mask = rendered.mask.numpy()
    if not mask.any():
        return None
    image = rendered.image.numpy().astype(float)
    grown = [mask]  # dilation with np.roll
    for _ in range(8):
        m = grown[-1]
        grown.append(m | np.roll(m, 1, 0) | np.roll(m, -1, 0) | np.roll(m, 1, 1) | np.roll(m, -1, 1))
    ring = grown[8] & ~grown[3]
    return float(image[mask].mean() - image[ring].mean())


def test_lesions_are_darker_than_the_tissue_around_them() -> None:
    ds = PhantomDataset(40, size=128)
    contrasts = [c for i in range(len(ds)) if (c := _lesion_minus_ring(ds.render(i))) is not None]
    assert sum(c < -10 for c in contrasts) / len(contrasts) > 0.9


def test_hyperechoic_lesions_are_brighter_and_change_nothing_else() -> None:
    bright = PhantomDataset(40, size=128, hyperechoic=1.0)
    contrasts = [c for i in range(len(bright)) if (c := _lesion_minus_ring(bright.render(i))) is not None]
    assert sum(c > 10 for c in contrasts) / len(contrasts) > 0.9
    half = PhantomDataset(40, size=128, hyperechoic=0.5)
    signs = [c > 0 for i in range(len(half)) if (c := _lesion_minus_ring(half.render(i))) is not None]
    assert 0.2 < sum(signs) / len(signs) < 0.8  # images of both kinds (an image may hold both)
    plain = PhantomDataset(40, size=128)
    for i in range(len(plain)):
        a, b = plain.render(i), bright.render(i)
        assert torch.equal(a.mask, b.mask) and a.num_lesions == b.num_lesions  # the same layout
        assert torch.equal(render_phantom(phantom_seed(0, i), size=128, hyperechoic=0.0).image, a.image)
        if a.mask.any():  # the same tissue and speckle: 20 px above the lesions (their posterior
            # effect is below them) only the margins' sigmoid tails remain, at most one grey level
            top = max(int(torch.nonzero(a.mask)[:, 0].min()) - 20, 0)
            assert bool(((a.image[:top].int() - b.image[:top].int()).abs() <= 1).all())
    assert bright.ids == plain.ids and bright.labels == plain.labels  # splits do not change
    assert "hyperechoic=1.0" in repr(bright) and "hyperechoic" not in repr(plain)


def test_speckle_is_rayleigh_with_mean_one() -> None:
    field = rayleigh_speckle(256, np.random.default_rng(0))
    assert field.shape == (256, 256) and field.dtype == np.float32 and bool((field >= 0).all())
    assert abs(float(field.mean()) - 1) < 0.03
    # Rayleigh: std / mean = sqrt(4 / pi - 1) ~ 0.523
    assert abs(float(field.std() / field.mean()) - math.sqrt(4 / math.pi - 1)) < 0.03
    # grains are longer laterally (x) than axially (y): neighbours along x correlate more
    centred = field - field.mean()
    corr_x = float((centred * np.roll(centred, 1, 1)).mean() / centred.var())
    corr_y = float((centred * np.roll(centred, 1, 0)).mean() / centred.var())
    assert corr_x > corr_y > 0


def test_speckle_is_present_in_the_image() -> None:
    ds = PhantomDataset(3, size=128)
    speckled, smooth = ds.render(0), ds.render(0, speckle=False)
    assert torch.equal(speckled.echogenicity, smooth.echogenicity)

    def roughness(image: torch.Tensor) -> float:  # mean absolute difference of neighbours
        x = image.float()
        return float((x[:, 1:] - x[:, :-1]).abs().mean())

    assert roughness(speckled.image) > 5 * roughness(smooth.image)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_images must be a positive int"):
        PhantomDataset(0)
    with pytest.raises(ValueError, match="size must be an int >= 32"):
        PhantomDataset(3, size=16)
    with pytest.raises(ValueError, match="size must be an int >= 32"):
        render_phantom(0, size=8)
    with pytest.raises(ValueError, match="seed must be an int >= 0"):
        render_phantom(-1)
    for bad in (1.5, -0.1, True, "0.5"):
        with pytest.raises(ValueError, match=r"hyperechoic must be a number in \[0, 1\], got"):
            render_phantom(0, size=64, hyperechoic=bad)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"hyperechoic must be a number in \[0, 1\], got"):
            PhantomDataset(3, size=64, hyperechoic=bad)  # type: ignore[arg-type]


def test_bright_lesions_are_the_hyperechoic_ones_of_the_mask() -> None:
    plain, bright = PhantomDataset(20, size=96), PhantomDataset(20, size=96, hyperechoic=1.0)
    half = PhantomDataset(20, size=96, hyperechoic=0.5)
    both_kinds = 0
    for i in range(20):
        mask = bright.render(i).mask
        assert torch.equal(half.render(i).mask, mask)  # same layout whatever the option
        assert not plain.bright_lesions(i).any()
        assert torch.equal(bright.bright_lesions(i), mask)  # every lesion pixel, margins included
        some = half.bright_lesions(i)
        assert not (some & ~mask).any()
        dark = mask & ~some
        if some.any() and dark.any():
            both_kinds += 1
            image = half.render(i, speckle=False).echogenicity
            assert image[some].mean() > 2 * image[dark].mean()
    assert both_kinds >= 1  # seed 0's first 20 images hold an image with a bright and a dark lesion


def test_render_script_times_renders_without_drawing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the render speed is a measurement (docs/data.md), not a timed assertion: only the output's form
    from examples import render_phantom as script

    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(tmp_path)
        assert script.main(["--time", "3", "--size", "64"]) == 0
    assert not list(tmp_path.iterdir())  # nothing drawn
    assert re.fullmatch(r"\d+\.\d ms per 64 x 64 image \(median of 3 renders, quartiles \d+\.\d-\d+\.\d ms\)\n",
                        capsys.readouterr().out)
    with pytest.raises(SystemExit):
        script.main(["--time", "-1"])


def test_render_script_draws_every_lesion_count(tmp_path: Path) -> None:
    from examples import render_phantom as script

    out = tmp_path / "img" / "phantom.png"
    assert script.main(["--out", str(out), "--size", "64", "--columns", "4"]) == 0
    with Image.open(out) as picture:
        assert picture.mode == "P" and picture.size == (4 * 64, 2 * 64)
        indices = np.asarray(picture)
        palette = picture.getpalette()
    assert palette is not None
    red = [i for i in range(len(palette) // 3) if palette[3 * i : 3 * i + 3] == [255, 40, 40]]
    assert len(red) == 1 and (indices[64:] == red[0]).any() and not (indices[:64] == red[0]).any()
    ds = PhantomDataset(64, size=64)
    assert sorted(ds.num_lesions(i) for i in script.pick_indices(ds, 4)) == [0, 1, 2, 3]


def test_render_script_draws_the_hyperechoic_phantom(tmp_path: Path) -> None:
    from examples import render_phantom as script

    plain, bright = tmp_path / "plain.png", tmp_path / "bright.png"
    assert script.main(["--out", str(plain), "--size", "64", "--columns", "4"]) == 0
    assert script.main(["--out", str(bright), "--size", "64", "--columns", "4", "--hyperechoic", "1"]) == 0
    with Image.open(plain) as a, Image.open(bright) as b:
        top_a, top_b = np.asarray(a)[:64].astype(int), np.asarray(b)[:64].astype(int)
    assert top_a.shape == top_b.shape and (top_b - top_a).mean() > 0  # brighter lesions, same layout
    with pytest.raises(SystemExit):
        script.main(["--out", str(bright), "--hyperechoic", "2"])
