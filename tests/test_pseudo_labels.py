"""pseudo_labels, entropy_keep_mask (the shared checklist, tests/op_tester.py) and the schedule of
keep_percent."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import strategies as st

from cscpa_layers import (
    PseudoLabels,
    entropy_keep_mask,
    keep_hard_schedule,
    keep_percent_schedule,
    pseudo_labels,
)
from tests.op_tester import BadInput, Call, Case, OpTester, RunCase


def _entropy(logits: torch.Tensor) -> torch.Tensor:
    return torch.special.entr(logits.softmax(1)).sum(1)


_FUNCTION_ONLY = {
    "module": "a function only",
    "repr": "a function only",
    "state_dict": "a function only",
}


@st.composite
def pseudo_label_calls(draw: st.DrawFn) -> Call:
    b, k, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    return Call((torch.randn(b, k, h, w),), {"threshold": draw(st.floats(0.0, 1.0))})


@st.composite
def per_class_calls(draw: st.DrawFn) -> Call:
    b, k, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 16)), draw(st.integers(1, 16))
    taus = draw(st.lists(st.floats(0.0, 1.0), min_size=k, max_size=k))
    return Call((torch.randn(b, k, h, w) * 2,), {"threshold": draw(st.sampled_from([taus, tuple(taus)]))})


def _dense_valid(logits: torch.Tensor, threshold: float | list[float] | tuple[float, ...]) -> torch.Tensor:
    """Pixel by pixel: the softmax's max against the threshold of its argmax class."""
    probs = logits.softmax(1)
    b, k, h, w = logits.shape
    taus = [threshold] * k if isinstance(threshold, float) else list(threshold)
    valid = torch.zeros(b, h, w, dtype=torch.bool)
    for i in range(b):
        for y in range(h):
            for x in range(w):
                column = probs[i, :, y, x]
                valid[i, y, x] = bool(column.max() >= taus[int(column.argmax())])
    return valid


class TestPseudoLabelsOp(OpTester):
    function = staticmethod(pseudo_labels)
    not_applicable = {
        **_FUNCTION_ONLY,
        "reference": "the argmax and max of a softmax: the property check compares them with torch's argmax",
        "gradcheck": "targets, detached by design (test_pseudo_labels_are_detached)",
    }

    def bad_inputs(self) -> list[BadInput]:
        return [
            BadInput("rank", lambda: pseudo_labels(torch.randn(2, 3, 3)), ValueError, r"logits must be 4-D \(B, K, H, W\), got 3-D"),
            BadInput("integer", lambda: pseudo_labels(torch.ones(1, 2, 3, 3, dtype=torch.long)), ValueError, r"floating-point"),
            BadInput("threshold", lambda: pseudo_labels(torch.randn(1, 2, 3, 3), threshold=1.1), ValueError,
                     r"threshold must be in \[0.0, 1.0\], got 1.1"),
            BadInput("threshold-nan", lambda: pseudo_labels(torch.randn(1, 2, 3, 3), threshold=float("nan")), ValueError,
                     r"threshold must be in \[0.0, 1.0\], got nan"),
            BadInput("threshold-count", lambda: pseudo_labels(torch.randn(1, 2, 3, 3), threshold=[0.8, 0.5, 0.5]),
                     ValueError, r"one value per class: expected K = 2 values, got 3"),
            BadInput("threshold-item", lambda: pseudo_labels(torch.randn(1, 2, 3, 3), threshold=[0.8, -0.1]),
                     ValueError, r"threshold\[1\] must be in \[0.0, 1.0\], got -0.1"),
            BadInput("threshold-str", lambda: pseudo_labels(torch.randn(1, 2, 3, 3), threshold="0.8"),  # type: ignore[arg-type]
                     TypeError, r"threshold must be a number or a sequence of K numbers, got str"),
            BadInput("no-class", lambda: pseudo_labels(torch.randn(1, 0, 3, 3)), ValueError, r"at least one class"),
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"logits-thresholds": pseudo_label_calls(), "per-class-thresholds": per_class_calls()}

    def check_output(self, call: Call, out: PseudoLabels) -> None:
        logits, threshold = call.args[0], call.kwargs["threshold"]
        b, k, h, w = logits.shape
        for field in out:
            assert field.shape == (b, h, w)
        assert torch.equal(out.labels, logits.argmax(1))
        assert ((out.confidence >= 1 / k - 1e-6) & (out.confidence <= 1)).all()
        if isinstance(threshold, float):
            assert torch.equal(out.valid, out.confidence >= threshold)
        else:  # per class: each pixel against its own class's tau, as a dense loop does it
            assert torch.equal(out.valid, _dense_valid(logits, threshold))

    def compile_cases(self) -> list[RunCase]:
        return [
            RunCase("logits", lambda: (pseudo_labels, Call((torch.randn(2, 3, 5, 7),), {"threshold": 0.6}))),
            RunCase("per-class", lambda: (pseudo_labels, Call((torch.randn(2, 3, 5, 7),), {"threshold": (0.9, 0.4, 0.6)}))),
        ]

    def device_cases(self) -> list[RunCase]:
        return [RunCase("logits", lambda: (pseudo_labels, Call((torch.randn(3, 2, 17, 19),))), tol={"atol": 1e-5, "rtol": 1.3e-6})]

    def degenerate_cases(self) -> list[Case]:
        def one_class(call: Call, out: PseudoLabels) -> None:
            assert not out.labels.any() and bool((out.confidence == 1).all()) and bool(out.valid.all())

        return [
            Case("empty-batch", lambda: Call((torch.randn(0, 2, 3, 3),)), shape=(0, 3, 3)),
            Case("1x1", lambda: Call((torch.randn(2, 2, 1, 1),)), shape=(2, 1, 1)),
            Case("one-class", lambda: Call((torch.randn(3, 1, 4, 5),)), shape=(3, 4, 5), check=one_class),
        ]


@st.composite
def keep_calls(draw: st.DrawFn) -> Call:
    n, percent = draw(st.integers(2, 400)), draw(st.floats(0.0, 100.0))
    return Call((torch.randn(1, 3, 1, n, dtype=torch.float64) * 3,), {"keep_percent": percent})


class TestEntropyKeepMaskOp(OpTester):
    function = staticmethod(entropy_keep_mask)
    not_applicable = {
        **_FUNCTION_ONLY,
        "reference": "U2PL's percentile rule agrees only up to one pixel; the property check compares with it",
        "gradcheck": "a bool mask, detached by design",
    }

    def bad_inputs(self) -> list[BadInput]:
        logits = torch.randn(1, 2, 3, 3)
        return [
            BadInput("keep_percent-range", lambda: entropy_keep_mask(logits, keep_percent=101), ValueError,
                     r"keep_percent must be in \[0.0, 100.0\], got 101"),
            BadInput("keep_percent-str", lambda: entropy_keep_mask(logits, keep_percent="80"), TypeError,  # type: ignore[arg-type]
                     r"keep_percent must be a number, got str"),
            BadInput("logits-rank", lambda: entropy_keep_mask(torch.randn(2, 3, 3), keep_percent=80), ValueError,
                     r"logits must be 4-D \(B, K, H, W\), got 3-D"),
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"u2pl": keep_calls()}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        # U2PL (the authors' code) keeps the pixels strictly below np.percentile(entropy, percent)
        logits, percent = call.args[0], call.kwargs["keep_percent"]
        n = logits.shape[-1]
        assert out.shape == (1, 1, n) and out.dtype == torch.bool
        entropy = _entropy(logits).flatten().numpy()
        u2pl = torch.from_numpy(entropy < np.percentile(entropy, percent))
        ours = out.flatten()
        assert abs(int(ours.sum()) - int(u2pl.sum())) <= 1
        assert bool((ours | u2pl).eq(ours).all()) or bool((ours | u2pl).eq(u2pl).all())  # nested sets
        assert int(ours.sum()) == math.floor(percent / 100 * n + 0.5 + 1e-9)

    def compile_cases(self) -> list[RunCase]:
        return [RunCase("logits", lambda: (entropy_keep_mask, Call((torch.randn(2, 3, 5, 7),), {"keep_percent": 80.0})))]

    def device_cases(self) -> list[RunCase]:
        logits = lambda percent: Call((torch.randn(3, 2, 17, 19),), {"keep_percent": percent})  # noqa: E731
        return [RunCase(f"keep-{p}", lambda p=p: (entropy_keep_mask, logits(p))) for p in (0, 33.3, 80, 100)]

    def degenerate_cases(self) -> list[Case]:
        def all_kept(call: Call, out: torch.Tensor) -> None:
            assert out.all()

        def none_kept(call: Call, out: torch.Tensor) -> None:
            assert not out.any()

        return [
            Case("empty-batch", lambda: Call((torch.randn(0, 2, 3, 3),), {"keep_percent": 80}), shape=(0, 3, 3)),
            Case("1x1-all", lambda: Call((torch.randn(1, 2, 1, 1),), {"keep_percent": 100}), shape=(1, 1, 1), check=all_kept),
            Case("none", lambda: Call((torch.randn(3, 2, 4, 4),), {"keep_percent": 0}), shape=(3, 4, 4), check=none_kept),
            Case("one-class", lambda: Call((torch.randn(3, 1, 4, 4),), {"keep_percent": 50}), shape=(3, 4, 4)),
        ]


# --- pseudo_labels ----------------------------------------------------------------------------


def test_pseudo_labels_hand_computed() -> None:
    logits = torch.tensor([[[[4.0, 0.0, 0.0]], [[0.0, 0.1, 0.0]], [[0.0, 0.0, 3.0]]]])  # (1, 3, 1, 3)
    out = pseudo_labels(logits, threshold=0.8)
    assert isinstance(out, PseudoLabels)
    assert out.labels.tolist() == [[[0, 1, 2]]] and out.labels.dtype == torch.int64
    expected = torch.stack([torch.softmax(logits[0, :, 0, j], 0).max() for j in range(3)]).view(1, 1, 3)
    torch.testing.assert_close(out.confidence, expected)
    assert out.valid.tolist() == [[[True, False, True]]]  # 0.96, 0.36, 0.91


def test_threshold_is_inclusive() -> None:
    out = pseudo_labels(torch.zeros(1, 2, 2, 2), threshold=0.5)  # two equal logits: confidence 0.5
    assert out.valid.all() and out.labels.eq(0).all()


def test_per_class_thresholds_hand_computed() -> None:
    # two pixels at confidence 0.6 (logit gap log 1.5), one labelled background and one lesion
    gap = math.log(1.5)
    logits = torch.tensor([[[[gap, 0.0]], [[0.0, gap]]]])  # (1, 2, 1, 2)
    out = pseudo_labels(logits, threshold=(0.8, 0.5))
    torch.testing.assert_close(out.confidence, torch.full((1, 1, 2), 0.6))
    assert out.labels.tolist() == [[[0, 1]]]
    assert out.valid.tolist() == [[[False, True]]]  # 0.6 < 0.8 for background, >= 0.5 for lesion
    assert pseudo_labels(logits, threshold=(0.5, 0.8)).valid.tolist() == [[[True, False]]]
    # equal thresholds are the one-threshold rule
    assert torch.equal(pseudo_labels(logits, threshold=[0.6, 0.6]).valid, pseudo_labels(logits, threshold=0.6).valid)


def test_pseudo_labels_are_detached() -> None:
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    out = pseudo_labels(logits)
    assert not out.confidence.requires_grad and out.confidence.grad_fn is None


def test_pseudo_labels_in_low_precision() -> None:
    logits = torch.randn(2, 3, 4, 4)
    out = pseudo_labels(logits.bfloat16())
    assert out.confidence.dtype == torch.bfloat16
    assert torch.equal(out.labels, logits.bfloat16().argmax(1))


# --- entropy_keep_mask -----------------------------------------------------------------------------


def test_keeps_the_lowest_entropy_pixels_with_round_half_up_counts() -> None:
    # 10 pixels of strictly increasing entropy: logit margins 9, 8, ..., 0
    margins = torch.arange(9.0, -1.0, -1.0)
    logits = torch.stack([margins, torch.zeros(10)]).view(1, 2, 2, 5)
    for percent, count in [(0, 0), (4, 0), (5, 1), (25, 3), (50, 5), (79.9, 8), (100, 10)]:
        keep = entropy_keep_mask(logits, keep_percent=percent)
        assert keep.shape == (1, 2, 5) and keep.dtype == torch.bool
        assert keep.flatten().tolist() == [i < count for i in range(10)], percent


def test_the_percentile_is_over_the_whole_batch() -> None:
    confident = torch.tensor([8.0, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    unsure = torch.tensor([0.5, 0.0]).view(1, 2, 1, 1).expand(1, 2, 3, 3)
    keep = entropy_keep_mask(torch.cat([unsure, confident]), keep_percent=50)
    assert not keep[0].any()  # all 9 uncertain pixels go
    assert int(keep[1].sum()) == 9  # round(0.5 * 18) = 9 kept, all from the confident image


def test_ties_keep_the_earlier_pixel() -> None:
    keep = entropy_keep_mask(torch.zeros(1, 2, 2, 2), keep_percent=50)
    assert keep.flatten().tolist() == [True, True, False, False]


def test_rescaling_snippet_gives_the_authors_weight() -> None:
    logits = torch.randn(2, 2, 4, 4)
    keep = entropy_keep_mask(logits, keep_percent=75)
    weight = keep.numel() / keep.sum().clamp_min(1)
    assert weight.item() == pytest.approx(32 / 24)


def test_entropy_keep_mask_is_detached() -> None:
    logits = torch.randn(2, 2, 3, 3, requires_grad=True)
    assert not entropy_keep_mask(logits, keep_percent=80).requires_grad


# --- schedules -------------------------------------------------------------------------------------


def test_keep_percent_schedule() -> None:
    assert keep_percent_schedule(0, 200) == 80.0
    assert keep_percent_schedule(50, 200) == 85.0
    assert keep_percent_schedule(200, 200) == 100.0
    assert keep_percent_schedule(1, 4, start=100.0, end=60.0) == 90.0


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: keep_hard_schedule(201, 200), ValueError, r"epoch must be in \[0.0, 200.0\], got 201"),
        (lambda: keep_hard_schedule(0, 0), ValueError, r"epochs must be a positive int, got 0"),
        (lambda: keep_hard_schedule(0, 10, start=1.5), ValueError, r"start must be in \[0.0, 1.0\], got 1.5"),
        (lambda: keep_percent_schedule(-1, 10), ValueError, r"epoch must be in \[0.0, 10.0\], got -1"),
        (lambda: keep_percent_schedule(0, 10, end=120.0), ValueError, r"end must be in \[0.0, 100.0\], got 120.0"),
        (lambda: keep_percent_schedule(0, 10.0), TypeError, r"epochs must be an int, got float"),  # type: ignore[arg-type]
    ],
)
def test_bad_schedule_arguments_raise(call: object, error: type[Exception], message: str) -> None:
    # the schedules are plain float functions, not tensor ops, so they are not OpTester ops
    assert callable(call)
    with pytest.raises(error, match=message):
        call()
