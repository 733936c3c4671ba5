"""confidence_mask and ConfidenceMasking: counts, ranking, reproducibility, the loop reference."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cscpa_layers import ConfidenceMasking, MaskedImages, confidence_mask, keep_hard_schedule
from cscpa_layers._reference.confidence_mask import confidence_mask_loop
from cscpa_layers.confidence_mask import ceil_count
from tests.conftest import DEVICES


def _probs(b: int, k: int, h: int, w: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Softmax probabilities with a per-image background bias, so foreground shares vary."""
    gen = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(b, k, h, w, generator=gen, dtype=dtype)
    logits[:, 0] += 3 * torch.randn(b, 1, 1, generator=gen, dtype=dtype)
    return logits.softmax(1)


def _patch_view(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 1, H, W) pixel mask -> (B, rows, cols) patch mask, read at each patch's top-left pixel."""
    return mask[:, 0, ::patch_size, ::patch_size]


def _patch_stats(probs: torch.Tensor, patch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch (#foreground pixels, hardness) by plain loops, (B, rows, cols) each."""
    b, _, h, w = probs.shape
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    counts = torch.zeros(b, rows, cols)
    hardness = torch.full((b, rows, cols), -1.0, dtype=torch.float64)
    for i in range(b):
        for r in range(rows):
            for c in range(cols):
                patch = probs[i, :, r * patch_size : (r + 1) * patch_size, c * patch_size : (c + 1) * patch_size]
                fg = patch.argmax(0) != 0
                counts[i, r, c] = fg.sum()
                if fg.any():
                    hardness[i, r, c] = torch.special.entr(patch).sum(0)[fg].mean()
    return counts, hardness


@st.composite
def mask_cases(draw: st.DrawFn) -> tuple[torch.Tensor, int, float, float, int]:
    b = draw(st.integers(1, 3))
    k = draw(st.integers(1, 4))
    h = draw(st.integers(1, 32))
    w = draw(st.integers(1, 32))
    patch_size = draw(st.integers(1, 12))
    keep_hard = draw(st.sampled_from([0.0, 0.25, 0.7, 1.0]))
    mask_ratio = draw(st.sampled_from([0.0, 0.3, 0.7, 1.0]))
    seed = draw(st.integers(0, 2**16))
    return _probs(b, k, h, w, seed=seed), patch_size, keep_hard, mask_ratio, seed


# --- smoke and properties ---------------------------------------------------------------------


def test_smoke() -> None:
    probs = _probs(2, 2, 513, 513, dtype=torch.float32)
    mask = confidence_mask(probs, generator=torch.Generator().manual_seed(0))
    assert mask.shape == (2, 1, 513, 513) and mask.dtype == torch.bool and mask.device == probs.device
    # 9 x 9 grid of 57-pixel patches; at most 70 % of them masked, rounded up
    patches = _patch_view(mask, 57)
    assert patches.shape == (2, 9, 9)
    assert ((patches.flatten(1).sum(1) <= math.ceil(0.7 * 81))).all()


@given(mask_cases())
def test_counts_follow_the_formula_and_hardest_patches_survive(case: tuple[torch.Tensor, int, float, float, int]) -> None:
    probs, patch_size, keep_hard, mask_ratio, seed = case
    mask = confidence_mask(probs, patch_size=patch_size, keep_hard=keep_hard, mask_ratio=mask_ratio,
                           generator=torch.Generator().manual_seed(seed))
    b, _, h, w = probs.shape
    assert mask.shape == (b, 1, h, w) and mask.dtype == torch.bool
    patches = _patch_view(mask, patch_size)
    # the mask is constant over every patch, partial ones included
    expanded = patches.repeat_interleave(patch_size, 1).repeat_interleave(patch_size, 2)[:, :h, :w]
    assert torch.equal(expanded, mask[:, 0])
    counts, hardness = _patch_stats(probs, patch_size)
    total = patches[0].numel()
    for i in range(b):
        n_fg = int((counts[i] > 0).sum())
        n_keep = math.ceil(keep_hard * n_fg - 1e-9)
        assert int(patches[i].sum()) == math.ceil(mask_ratio * (total - n_keep) - 1e-9)
        # every kept patch is unmasked, and it is at least as hard as any other foreground patch
        if n_keep:
            threshold = hardness[i].flatten().sort(descending=True).values[n_keep - 1]
            hard = hardness[i] > threshold
            assert not patches[i][hard].any()


@given(mask_cases())
def test_equals_the_loop_reference(case: tuple[torch.Tensor, int, float, float, int]) -> None:
    probs, patch_size, keep_hard, mask_ratio, seed = case
    fast = confidence_mask(probs, patch_size=patch_size, keep_hard=keep_hard, mask_ratio=mask_ratio,
                           generator=torch.Generator().manual_seed(seed))
    loop = confidence_mask_loop(probs, patch_size, keep_hard, mask_ratio, torch.Generator().manual_seed(seed))
    assert torch.equal(fast, loop)


# --- hand-built map ---------------------------------------------------------------------------


def _hand_built() -> torch.Tensor:
    """10 x 10 image, 3-pixel patches: a 4 x 4 grid whose last row and column are partial.

    Background (p0 = 0.95) everywhere except foreground pixels in 5 patches, hardest first:
    (3, 3) the 1 x 1 corner patch, p1 = 0.55; (0, 0) with p1 = 0.6; (1, 2) with two pixels,
    p1 = 0.65 and p1 = 0.99 (mean entropy between those of (2, 1) and (0, 3));
    (2, 1) with p1 = 0.7; (0, 3) with p1 = 0.95, the easiest.
    """
    p1 = torch.full((10, 10), 0.05, dtype=torch.float64)
    p1[9, 9] = 0.55
    p1[0, 0] = 0.6
    p1[3, 6], p1[4, 7] = 0.65, 0.99
    p1[6, 3] = 0.7
    p1[1, 9] = 0.95
    return torch.stack([1 - p1, p1]).unsqueeze(0)  # (1, 2, 10, 10)


def test_hand_built_map_exact_counts_and_kept_patches() -> None:
    probs = _hand_built()
    counts, hardness = _patch_stats(probs, 3)
    assert int((counts[0] > 0).sum()) == 5
    order = [(3, 3), (0, 0), (2, 1), (1, 2), (0, 3)]  # hardest first by mean entropy
    values = [hardness[0, r, c].item() for r, c in order]
    assert values == sorted(values, reverse=True)
    for keep_hard, kept in [(0.5, order[:3]), (0.2, order[:1]), (0.21, order[:2]), (1.0, order), (0.0, [])]:
        for mask_ratio in (0.0, 0.5, 0.7, 1.0):
            for seed in range(5):
                mask = confidence_mask(probs, patch_size=3, keep_hard=keep_hard, mask_ratio=mask_ratio,
                                       generator=torch.Generator().manual_seed(seed))
                patches = _patch_view(mask, 3)[0]
                n_keep = len(kept)  # ceil(0.5 * 5) = 3, ceil(0.2 * 5) = 1, ceil(0.21 * 5) = 2
                assert int(patches.sum()) == math.ceil(mask_ratio * (16 - n_keep) - 1e-9)
                assert not any(patches[r, c] for r, c in kept)
                if mask_ratio == 1.0:  # everything else goes
                    assert int(patches.sum()) == 16 - n_keep
    # the corner patch is 1 x 1: its pixel follows the patch
    mask = confidence_mask(probs, patch_size=3, keep_hard=0.0, mask_ratio=1.0)
    assert mask.all()


def test_rounding_is_ceil_and_exact_for_decimal_fractions() -> None:
    counts = torch.tensor([0, 1, 3, 10, 100, 81])
    assert ceil_count(counts, 0.7).tolist() == [0, 1, 3, 7, 70, 57]
    assert ceil_count(counts, 0.07).tolist() == [0, 1, 1, 1, 7, 6]  # 0.07 * 100 = 7.000000000000001
    assert ceil_count(counts, 0.0).tolist() == [0] * 6
    assert ceil_count(counts, 1.0).tolist() == counts.tolist()


def test_only_background_masks_a_share_of_all_patches() -> None:
    probs = torch.zeros(2, 3, 20, 20, dtype=torch.float64)
    probs[:, 0] = 1.0  # K = 3, every pixel background
    mask = confidence_mask(probs, patch_size=5, keep_hard=1.0, mask_ratio=0.7)
    assert _patch_view(mask, 5).flatten(1).sum(1).tolist() == [12, 12]  # ceil(0.7 * 16)
    single_class = torch.ones(1, 1, 20, 20)
    assert int(_patch_view(confidence_mask(single_class, patch_size=5), 5).sum()) == 12


def test_argmax_ties_are_background() -> None:
    probs = torch.full((1, 2, 4, 4), 0.5)  # every pixel ties: argmax gives class 0
    mask = confidence_mask(probs, patch_size=2, keep_hard=1.0, mask_ratio=1.0)
    assert mask.all()  # no foreground patch, so nothing is kept


# --- randomness -------------------------------------------------------------------------------


def test_identical_seeds_give_identical_masks_and_others_differ() -> None:
    probs = _probs(4, 2, 100, 100)
    masks = [confidence_mask(probs, patch_size=10, generator=torch.Generator().manual_seed(s)) for s in (7, 7, 8)]
    assert torch.equal(masks[0], masks[1])
    assert not torch.equal(masks[0], masks[2])


def test_global_generator_is_used_without_one() -> None:
    probs = _probs(2, 2, 30, 30)
    torch.manual_seed(3)
    first = confidence_mask(probs, patch_size=5)
    torch.manual_seed(3)
    assert torch.equal(first, confidence_mask(probs, patch_size=5))


def test_masked_patches_are_spread_uniformly() -> None:
    # with no foreground, every patch has the same chance ceil(0.5 * 4) / 4 = 1/2
    probs = torch.zeros(1000, 2, 4, 4)
    probs[:, 0] = 1.0
    frequency = _patch_view(confidence_mask(probs, patch_size=2, mask_ratio=0.5), 2).float().mean(0)
    assert ((frequency - 0.5).abs() < 0.06).all()


# --- degenerate input -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 2, 8, 8), (2, 2, 0, 8), (2, 2, 1, 1), (1, 2, 5, 7), (3, 2, 57, 58)])
def test_degenerate_and_partial_shapes(shape: tuple[int, int, int, int]) -> None:
    probs = _probs(*shape)
    mask = confidence_mask(probs, patch_size=57)
    assert mask.shape == (shape[0], 1, *shape[2:])
    loop = confidence_mask_loop(probs, 57, 0.7, 0.7, torch.Generator().manual_seed(1))
    assert torch.equal(confidence_mask(probs, patch_size=57, generator=torch.Generator().manual_seed(1)), loop)


def test_low_precision_probabilities_match_float64() -> None:
    probs = _probs(2, 2, 60, 60)
    expected = confidence_mask(probs, patch_size=57, generator=torch.Generator().manual_seed(0))
    # a patch's mean entropy is compared across patches; bfloat16 rounding may swap close
    # neighbours, so compare the counts, and float32 exactly
    got32 = confidence_mask(probs.float(), patch_size=57, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got32, expected)
    got16 = confidence_mask(probs.bfloat16(), patch_size=57, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_patch_view(got16, 57).sum((1, 2)), _patch_view(expected, 57).sum((1, 2)))


# --- the schedule of keep_hard ---------------------------------------------------------------


def test_keep_hard_schedule() -> None:
    assert keep_hard_schedule(0, 200) == pytest.approx(0.7)
    assert keep_hard_schedule(50, 200) == pytest.approx(0.525)
    assert keep_hard_schedule(200, 200) == 0.0
    assert keep_hard_schedule(2.5, 10, start=0.4) == pytest.approx(0.3)


def test_keep_hard_schedule_lives_with_the_masking_and_is_re_exported() -> None:
    # importlib: the package attribute `confidence_mask` is the function, not the module
    masking_module = importlib.import_module("cscpa_layers.confidence_mask")
    pseudo_labels_module = importlib.import_module("cscpa_layers.pseudo_labels")
    assert keep_hard_schedule.__module__ == "cscpa_layers.confidence_mask"
    # the old home and the package root still give the same function
    assert masking_module.keep_hard_schedule is pseudo_labels_module.keep_hard_schedule is keep_hard_schedule


# --- the module -------------------------------------------------------------------------------


def test_module_fills_masked_pixels_and_keeps_the_rest() -> None:
    images = torch.randn(2, 3, 40, 30)
    probs = _probs(2, 2, 40, 30, dtype=torch.float32)
    out = ConfidenceMasking(patch_size=8, fill=-1.5)(images, probs, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, MaskedImages)
    assert out.images.shape == images.shape and out.mask.shape == (2, 1, 40, 30)
    full = out.mask.expand_as(images)
    assert (out.images[full] == -1.5).all()
    assert torch.equal(out.images[~full], images[~full])
    assert out.mask.any() and not out.mask.all()


def test_module_equals_function_and_keep_hard_overrides() -> None:
    images = torch.randn(2, 1, 50, 50)
    probs = _probs(2, 2, 50, 50)
    layer = ConfidenceMasking(patch_size=10, keep_hard=0.7, mask_ratio=0.4)
    for keep_hard in (None, 0.2):
        out = layer(images, probs, keep_hard=keep_hard, generator=torch.Generator().manual_seed(5))
        expected = confidence_mask(probs, patch_size=10, keep_hard=0.7 if keep_hard is None else keep_hard,
                                   mask_ratio=0.4, generator=torch.Generator().manual_seed(5))
        assert torch.equal(out.mask, expected)


def test_extra_repr_shows_every_hyper_parameter() -> None:
    text = repr(ConfidenceMasking(patch_size=16, keep_hard=0.5, mask_ratio=0.6, fill=-1.0))
    for part in ("patch_size=16", "keep_hard=0.5", "mask_ratio=0.6", "fill=-1.0"):
        assert part in text


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_cuda_is_reproducible_and_agrees_with_cpu_where_no_randomness_is_involved() -> None:
    probs = _probs(3, 2, 120, 130, dtype=torch.float32)
    cuda = probs.cuda()
    a = confidence_mask(cuda, patch_size=19, generator=torch.Generator("cuda").manual_seed(0))
    b = confidence_mask(cuda, patch_size=19, generator=torch.Generator("cuda").manual_seed(0))
    assert a.device.type == "cuda" and torch.equal(a, b)
    for mask_ratio in (0.0, 1.0):  # no random choice: the kept (hardest) patches decide
        expected = confidence_mask(probs, patch_size=19, mask_ratio=mask_ratio)
        assert torch.equal(confidence_mask(cuda, patch_size=19, mask_ratio=mask_ratio).cpu(), expected)
    # the numbers are drawn on the generator's device, so one CPU generator gives the CPU mask
    # for CUDA probabilities, random choice included
    for mask_ratio in (0.3, 0.7):
        expected = confidence_mask(probs, patch_size=19, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(4))
        got = confidence_mask(cuda, patch_size=19, mask_ratio=mask_ratio, generator=torch.Generator().manual_seed(4))
        assert got.device.type == "cuda" and torch.equal(got.cpu(), expected)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"patch_size": 0}, ValueError, r"patch_size must be a positive int, got 0"),
        ({"patch_size": -3}, ValueError, r"patch_size must be a positive int, got -3"),
        ({"patch_size": 2.5}, TypeError, r"patch_size must be an int, got float"),
        ({"keep_hard": 1.2}, ValueError, r"keep_hard must be in \[0.0, 1.0\], got 1.2"),
        ({"mask_ratio": -0.1}, ValueError, r"mask_ratio must be in \[0.0, 1.0\], got -0.1"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        confidence_mask(_probs(1, 2, 4, 4), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        ConfidenceMasking(**kwargs)  # type: ignore[arg-type]


def test_bad_probs_raise() -> None:
    with pytest.raises(ValueError, match=r"probs must be 4-D \(B, K, H, W\), got 3-D"):
        confidence_mask(torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match=r"probs must be a floating-point tensor"):
        confidence_mask(torch.ones(1, 2, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"probs must lie in \[0.0, 1.0\]"):
        confidence_mask(torch.randn(1, 2, 4, 4) * 5)
    with pytest.raises(ValueError, match=r"at least one class"):
        confidence_mask(torch.rand(1, 0, 4, 4))
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        confidence_mask(_probs(1, 2, 4, 4), generator=0)  # type: ignore[arg-type]


def test_module_rejects_mismatched_images() -> None:
    layer = ConfidenceMasking(patch_size=4)
    probs = _probs(2, 2, 8, 8)
    with pytest.raises(ValueError, match=r"probs must have the batch size and spatial size of images, \(B, H, W\) = \(2, 8, 9\), got \(2, 8, 8\)"):
        layer(torch.randn(2, 3, 8, 9), probs)
    with pytest.raises(ValueError, match=r"\(B, H, W\) = \(3, 8, 8\), got \(2, 8, 8\)"):
        layer(torch.randn(3, 3, 8, 8), probs)
    with pytest.raises(ValueError, match=r"images must be 4-D \(B, C_img, H, W\), got 3-D"):
        layer(torch.randn(3, 8, 8), probs)
    with pytest.raises(TypeError, match=r"fill must be a number, got str"):
        ConfidenceMasking(fill="0")  # type: ignore[arg-type]
