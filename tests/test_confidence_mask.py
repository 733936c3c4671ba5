"""confidence_mask and ConfidenceMasking: the shared checklist (tests/op_tester.py), counts,
ranking, randomness and the schedule of keep_hard."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from cscpa_layers import ConfidenceMasking, MaskedImages, confidence_mask, keep_hard_schedule
from cscpa_layers._reference.confidence_mask import confidence_mask_loop
from cscpa_layers.confidence_mask import ceil_count
from tests.op_tester import BadInput, Call, Case, ModuleCase, OpTester, ReprCase, RunCase


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


def _mask_call(probs: torch.Tensor, patch_size: int = 57, keep_hard: float = 0.7, mask_ratio: float = 0.7, seed: int | None = 1) -> Call:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    options = {"patch_size": patch_size, "keep_hard": keep_hard, "mask_ratio": mask_ratio, "generator": generator}
    return Call((probs,), options)


class TestConfidenceMaskOp(OpTester):
    function = staticmethod(confidence_mask)
    reference = staticmethod(confidence_mask_loop)
    not_applicable = {
        "gradcheck": "a mask of patches, computed without gradient",
        "state_dict": "the module has no parameters or buffers",
        "compile": "documented as not meant for torch.compile: it takes a torch.Generator, and it is cheap already",
    }

    def bad_inputs(self) -> list[BadInput]:
        cases = []
        for name, kwargs, error, message in [
            ("patch_size-0", {"patch_size": 0}, ValueError, r"patch_size must be a positive int, got 0"),
            ("patch_size-negative", {"patch_size": -3}, ValueError, r"patch_size must be a positive int, got -3"),
            ("patch_size-float", {"patch_size": 2.5}, TypeError, r"patch_size must be an int, got float"),
            ("keep_hard", {"keep_hard": 1.2}, ValueError, r"keep_hard must be in \[0.0, 1.0\], got 1.2"),
            ("mask_ratio", {"mask_ratio": -0.1}, ValueError, r"mask_ratio must be in \[0.0, 1.0\], got -0.1"),
        ]:
            cases.append(BadInput(f"{name}-function", lambda k=kwargs: confidence_mask(_probs(1, 2, 4, 4), **k), error, message))  # type: ignore[arg-type]
            cases.append(BadInput(f"{name}-module", lambda k=kwargs: ConfidenceMasking(**k), error, message))  # type: ignore[arg-type]
        layer, probs = ConfidenceMasking(patch_size=4), _probs(2, 2, 8, 8)
        return [
            *cases,
            BadInput("probs-rank", lambda: confidence_mask(torch.rand(2, 4, 4)), ValueError, r"probs must be 4-D \(B, K, H, W\), got 3-D"),
            BadInput("probs-integer", lambda: confidence_mask(torch.ones(1, 2, 4, 4, dtype=torch.long)), ValueError,
                     r"probs must be a floating-point tensor"),
            BadInput("probs-range", lambda: confidence_mask(torch.randn(1, 2, 4, 4) * 5), ValueError, r"probs must lie in \[0.0, 1.0\]"),
            BadInput("probs-no-class", lambda: confidence_mask(torch.rand(1, 0, 4, 4)), ValueError, r"at least one class"),
            BadInput("generator", lambda: confidence_mask(_probs(1, 2, 4, 4), generator=0), TypeError,  # type: ignore[arg-type]
                     r"generator must be a torch.Generator or None, got int"),
            BadInput("images-width", lambda: layer(torch.randn(2, 3, 8, 9), probs), ValueError,
                     r"probs must have the batch size and spatial size of images, \(B, H, W\) = \(2, 8, 9\), got \(2, 8, 8\)"),
            BadInput("images-batch", lambda: layer(torch.randn(3, 3, 8, 8), probs), ValueError, r"\(B, H, W\) = \(3, 8, 8\), got \(2, 8, 8\)"),
            BadInput("images-rank", lambda: layer(torch.randn(3, 8, 8), probs), ValueError, r"images must be 4-D \(B, C_img, H, W\), got 3-D"),
            BadInput("fill", lambda: ConfidenceMasking(fill="0"), TypeError, r"fill must be a number, got str"),  # type: ignore[arg-type]
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"maps-patches-shares": mask_cases().map(lambda case: _mask_call(*case))}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        b, _, h, w = call.args[0].shape
        assert out.shape == (b, 1, h, w) and out.dtype == torch.bool

    def reference_cases(self) -> list[Case]:
        # partial patches at the right and bottom edges; the same generator state on both sides
        return [
            Case(f"partial-{h}x{w}-by-{patch}", lambda dtype, s=(b, h, w), p=patch: _mask_call(_probs(s[0], 2, s[1], s[2], dtype=dtype), p))
            for b, h, w, patch in [(1, 5, 7, 57), (3, 57, 58, 57), (2, 30, 23, 7)]
        ]

    def module_cases(self) -> list[ModuleCase]:
        def build(keep_hard: float | None) -> tuple[nn.Module, Call]:
            layer = ConfidenceMasking(patch_size=10, keep_hard=0.7, mask_ratio=0.4)
            options = {"keep_hard": keep_hard, "generator": torch.Generator().manual_seed(5)}
            return layer, Call((torch.randn(2, 1, 50, 50), _probs(2, 2, 50, 50)), options)

        return [ModuleCase("constructor-keep_hard", lambda: build(None)), ModuleCase("forward-keep_hard", lambda: build(0.2))]

    def module_as_function(self, module: nn.Module) -> object:
        assert isinstance(module, ConfidenceMasking)
        return lambda images, probs, *, keep_hard=None, generator=None: confidence_mask(
            probs, patch_size=module.patch_size, keep_hard=module.keep_hard if keep_hard is None else keep_hard,
            mask_ratio=module.mask_ratio, generator=generator,
        )

    def module_output(self, out: MaskedImages) -> torch.Tensor:
        return out.mask  # the images are the mask applied; test_module_fills_masked_pixels_and_keeps_the_rest

    def repr_cases(self) -> list[ReprCase]:
        return [ReprCase("every-option", lambda: ConfidenceMasking(patch_size=16, keep_hard=0.5, mask_ratio=0.6, fill=-1.0),
                         ("patch_size=16", "keep_hard=0.5", "mask_ratio=0.6", "fill=-1.0"))]

    def device_cases(self) -> list[RunCase]:
        def build(mask_ratio: float, seed: int | None) -> tuple[object, Call]:
            return confidence_mask, _mask_call(_probs(3, 2, 120, 130, dtype=torch.float32), 19, mask_ratio=mask_ratio, seed=seed)

        return [
            # no random choice: the kept (hardest) patches decide
            *(RunCase(f"no-randomness-{r}", lambda r=r: build(r, None)) for r in (0.0, 1.0)),
            # the numbers are drawn on the generator's device, so one CPU generator gives the CPU
            # mask for CUDA probabilities, random choice included
            *(RunCase(f"cpu-generator-{r}", lambda r=r: build(r, 4)) for r in (0.3, 0.7)),
        ]

    def degenerate_cases(self) -> list[Case]:
        return [
            Case("empty-batch", lambda: _mask_call(_probs(0, 2, 8, 8)), shape=(0, 1, 8, 8), reference=True),
            Case("zero-height", lambda: _mask_call(_probs(2, 2, 0, 8)), shape=(2, 1, 0, 8), reference=True),
            Case("1x1", lambda: _mask_call(_probs(2, 2, 1, 1)), shape=(2, 1, 1, 1), reference=True),
            Case("odd-batch", lambda: _mask_call(_probs(3, 2, 20, 20), 5), shape=(3, 1, 20, 20), reference=True),
            Case("one-class", lambda: _mask_call(torch.ones(1, 1, 20, 20), 5), shape=(1, 1, 20, 20), reference=True),
        ]


# --- counts, ranking and the loop reference -----------------------------------------------------


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


# --- hand-built map --------------------------------------------------------------------------------


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


# --- randomness ------------------------------------------------------------------------------------


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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_generator_is_reproducible() -> None:
    cuda = _probs(3, 2, 120, 130, dtype=torch.float32).cuda()
    a = confidence_mask(cuda, patch_size=19, generator=torch.Generator("cuda").manual_seed(0))
    b = confidence_mask(cuda, patch_size=19, generator=torch.Generator("cuda").manual_seed(0))
    assert a.device.type == "cuda" and torch.equal(a, b)


# --- precision and the module ----------------------------------------------------------------------


def test_low_precision_probabilities_match_float64() -> None:
    probs = _probs(2, 2, 60, 60)
    expected = confidence_mask(probs, patch_size=57, generator=torch.Generator().manual_seed(0))
    # a patch's mean entropy is compared across patches; bfloat16 rounding may swap close
    # neighbours, so compare the counts, and float32 exactly
    got32 = confidence_mask(probs.float(), patch_size=57, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got32, expected)
    got16 = confidence_mask(probs.bfloat16(), patch_size=57, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_patch_view(got16, 57).sum((1, 2)), _patch_view(expected, 57).sum((1, 2)))


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


# --- the schedule of keep_hard ---------------------------------------------------------------------


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
