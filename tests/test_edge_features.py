"""edge_mask and select_edge_features: hand-drawn masks, the dense reference, properties, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cscpa_layers import edge_mask, select_edge_features
from cscpa_layers._reference.edge_attention import edge_mask_dense
from tests.conftest import DEVICES, compile_available

I = 255  # the ignore label, short so the hand-drawn masks stay readable


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.long)  # (1, H, W)


def _bool(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([rows], dtype=torch.bool)


@st.composite
def label_maps(draw: st.DrawFn) -> tuple[torch.Tensor, int]:
    b = draw(st.integers(0, 3))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    classes = draw(st.sampled_from([[0, 1], [0, 1, I], [0, 1, 2, 7], [-100, 0, 1]]))
    ignore_index = -100 if -100 in classes else I
    seed = draw(st.integers(0, 2**16))
    index = torch.randint(len(classes), (b, h, w), generator=torch.Generator().manual_seed(seed))
    return torch.tensor(classes)[index], ignore_index


def _pixel_ids(b: int, c: int, h: int, w: int) -> torch.Tensor:
    """Features whose channel 0 holds the flat pixel index b*N + p, to identify selected rows."""
    feats = torch.randn(b, c, h, w)
    feats[:, 0] = torch.arange(b * h * w, dtype=torch.float32).view(b, h, w)
    return feats


# --- edge_mask: hand-drawn masks ------------------------------------------------------------


def test_lesion_touching_the_border() -> None:
    labels = _mask(
        [
            [1, 1, 0, 0, 0],
            [1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    # The corner pixel sees only lesion (its off-image neighbours take no part): not an edge.
    expected = _bool(
        [
            [0, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    assert torch.equal(edge_mask(labels), expected)
    assert torch.equal(edge_mask_dense(labels), expected)


def test_lesion_filling_a_whole_side_has_no_edge_along_the_border() -> None:
    # The lesion covers the top two rows edge to edge: only its lower boundary is an edge; the
    # image border (off-image neighbours) never counts as background.
    labels = _mask([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]])
    expected = _bool([[0, 0, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])
    assert torch.equal(edge_mask(labels), expected)


def test_lesion_with_ignored_pixels() -> None:
    # Ignored pixels are never edges and make no neighbour an edge: (0, 4) and (1, 4) touch the
    # ignored (1, 3) but otherwise see only background. (0, 0) sees the lesion diagonally.
    labels = _mask(
        [
            [0, I, I, 0, 0],
            [I, 1, 1, I, 0],
            [0, 1, 1, 0, 0],
            [0, 0, 0, 0, 0],
        ]
    )
    expected = _bool(
        [
            [1, 0, 0, 1, 0],
            [0, 1, 1, 0, 0],
            [1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0],
        ]
    )
    assert torch.equal(edge_mask(labels), expected)
    assert torch.equal(edge_mask_dense(labels), expected)


def test_lesion_fully_wrapped_in_ignored_pixels_has_no_edge() -> None:
    labels = _mask([[0, 0, 0, 0, 0], [0, I, I, I, 0], [0, I, 1, I, 0], [0, I, I, I, 0], [0, 0, 0, 0, 0]])
    assert not edge_mask(labels).any()


def test_three_classes_and_a_custom_ignore_index() -> None:
    labels = _mask([[2, 2, 2], [-1, -1, -1], [1, 1, 1]])
    # With -1 ignored, rows 0 and 2 never see each other (a 3x3 window spans only 3 rows).
    assert not edge_mask(labels, ignore_index=-1).any()
    # Without ignoring -1 every pixel sees two or three classes.
    assert edge_mask(labels, ignore_index=I).all()


def test_labels_beyond_float32_precision_stay_distinct() -> None:
    # 2**25 and 2**25 + 1 are the same float32; the pooling must not merge them.
    labels = torch.full((1, 3, 3), 2**25, dtype=torch.long)
    labels[0, 1, 1] += 1
    assert edge_mask(labels).all()


def test_uniform_and_all_ignored_maps_have_no_edges() -> None:
    assert not edge_mask(torch.ones(2, 5, 4, dtype=torch.long)).any()
    assert not edge_mask(torch.full((2, 5, 4), I, dtype=torch.long)).any()


def test_degenerate_sizes() -> None:
    assert edge_mask(torch.tensor([[[1]]])).tolist() == [[[False]]]  # 1x1
    assert edge_mask(torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 4, 4)
    assert edge_mask(torch.zeros(2, 0, 4, dtype=torch.long)).shape == (2, 0, 4)
    assert edge_mask(torch.tensor([[[0, 1]]])).tolist() == [[[True, True]]]  # 1x2


def test_any_integer_dtype() -> None:
    labels = _mask([[0, 0, 1], [0, 0, 0]])
    expected = edge_mask(labels)
    for dtype in (torch.uint8, torch.int8, torch.int16, torch.int32):
        assert torch.equal(edge_mask(labels.to(dtype)), expected)


# --- edge_mask: properties ------------------------------------------------------------------


@given(label_maps())
def test_edge_mask_matches_the_dense_reference(case: tuple[torch.Tensor, int]) -> None:
    labels, ignore_index = case
    out = edge_mask(labels, ignore_index=ignore_index)
    assert out.shape == labels.shape and out.dtype == torch.bool
    assert torch.equal(out, edge_mask_dense(labels, ignore_index))
    assert not (out & (labels == ignore_index)).any()


@given(label_maps())
def test_binary_edges_are_symmetric_in_the_two_classes(case: tuple[torch.Tensor, int]) -> None:
    labels, _ = case
    binary = labels.clamp(0, 1)
    assert torch.equal(edge_mask(binary), edge_mask(1 - binary))


# --- select_edge_features -------------------------------------------------------------------


def _lesion(b: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    labels = torch.zeros(b, h, w, dtype=torch.long)
    labels[:, 2:6, 3:7] = 1
    return labels


def test_select_smoke_and_rows_come_from_edge_pixels() -> None:
    feats = _pixel_ids(2, 5, 8, 8)
    prediction = _lesion()
    rows = select_edge_features(feats, prediction, num=1000)
    candidates = edge_mask(prediction).flatten().nonzero().squeeze(1)
    assert rows.shape == (candidates.numel(), 5)
    assert sorted(rows[:, 0].long().tolist()) == candidates.tolist()
    # every row is the full feature vector of its pixel
    ids = rows[:, 0].long()
    torch.testing.assert_close(rows, feats.flatten(2)[ids // 64, :, ids % 64])


def test_select_draws_num_distinct_rows_at_random() -> None:
    feats = _pixel_ids(2, 3, 8, 8)
    prediction = _lesion()
    first = select_edge_features(feats, prediction, num=10, generator=torch.Generator().manual_seed(1))
    again = select_edge_features(feats, prediction, num=10, generator=torch.Generator().manual_seed(1))
    other = select_edge_features(feats, prediction, num=10, generator=torch.Generator().manual_seed(2))
    assert first.shape == (10, 3)
    assert len(set(first[:, 0].tolist())) == 10  # without replacement
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert edge_mask(prediction).flatten()[first[:, 0].long()].all()


def test_target_keeps_correct_and_unignored_edge_pixels_only() -> None:
    feats = _pixel_ids(1, 2, 4, 4)
    prediction = _mask([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])  # all pixels are edges
    target = _mask([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, I, 0], [0, 0, 0, 0]])
    rows = select_edge_features(feats, prediction, target=target, num=100)
    keep = (prediction == target) & (target != I) & edge_mask(prediction)
    assert sorted(rows[:, 0].long().tolist()) == keep.flatten().nonzero().squeeze(1).tolist()
    assert rows.shape[0] == 14


def test_confidence_threshold_and_both_filters() -> None:
    feats = _pixel_ids(1, 2, 4, 4)
    prediction = _mask([[0, 0, 0, 0], [0, 1, 1, 0], [0, 1, 1, 0], [0, 0, 0, 0]])
    confidence = torch.linspace(0, 1, 16).view(1, 4, 4)
    rows = select_edge_features(feats, prediction, confidence=confidence, threshold=0.5, num=100)
    assert sorted(rows[:, 0].long().tolist()) == list(range(8, 16))
    # exactly at the threshold is kept
    at = select_edge_features(feats, prediction, confidence=confidence, threshold=float(confidence[0, 2, 0]), num=100)
    assert sorted(at[:, 0].long().tolist()) == list(range(8, 16))
    target = prediction.clone()
    target[0, 3, 3] = 1  # wrong there
    both = select_edge_features(feats, prediction, target=target, confidence=confidence, threshold=0.5, num=100)
    assert sorted(both[:, 0].long().tolist()) == list(range(8, 15))


def test_selected_rows_stay_in_the_graph() -> None:
    feats = torch.randn(1, 3, 4, 4, requires_grad=True)
    prediction = _mask([[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    rows = select_edge_features(feats, prediction)
    rows.sum().backward()
    assert feats.grad is not None
    touched = feats.grad.abs().sum(1)[0] > 0  # (H, W)
    assert torch.equal(touched, edge_mask(prediction)[0])


@st.composite
def select_cases(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor, int]:
    labels, _ = draw(label_maps())
    c = draw(st.integers(1, 6))
    num = draw(st.integers(1, 50))
    b, h, w = labels.shape
    return torch.randn(b, c, h, w), labels.clamp(0, 1), num


@given(select_cases())
def test_select_returns_min_of_num_and_candidates(case: tuple[torch.Tensor, torch.Tensor, int]) -> None:
    feats, prediction, num = case
    rows = select_edge_features(feats, prediction, num=num)
    count = int(edge_mask(prediction).sum())
    assert rows.shape == (min(num, count), feats.shape[1])
    assert rows.dtype == feats.dtype


def test_select_degenerate_inputs() -> None:
    feats = torch.randn(2, 4, 5, 5)
    assert select_edge_features(feats, torch.full((2, 5, 5), I)).shape == (0, 4)  # all ignored
    assert select_edge_features(torch.randn(3, 4, 1, 1), torch.ones(3, 1, 1, dtype=torch.long)).shape == (0, 4)
    assert select_edge_features(torch.randn(0, 4, 5, 5), torch.zeros(0, 5, 5, dtype=torch.long)).shape == (0, 4)
    zero = select_edge_features(torch.zeros(2, 4, 8, 8), _lesion())
    assert zero.shape[0] > 0 and torch.isfinite(zero).all()
    low = select_edge_features(feats, _lesion(2, 5, 5), confidence=torch.zeros(2, 5, 5))
    assert low.shape == (0, 4)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    labels = torch.randint(0, 3, (3, 9, 11))
    labels[0, :3] = I
    assert torch.equal(edge_mask(labels.cuda()).cpu(), edge_mask(labels))
    feats = _pixel_ids(2, 3, 8, 8)
    want = sorted(select_edge_features(feats, _lesion(), num=1000)[:, 0].long().tolist())
    for generator in (torch.Generator("cuda"), torch.Generator("cpu")):  # draw on either device
        rows = select_edge_features(feats.cuda(), _lesion().cuda(), num=1000, generator=generator)
        assert sorted(rows[:, 0].long().tolist()) == want


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_edge_mask_compiled_equals_eager() -> None:
    labels = torch.randint(0, 3, (2, 7, 9))
    labels[0, :2] = I
    compiled = torch.compile(edge_mask, fullgraph=True)
    assert torch.equal(compiled(labels), edge_mask(labels))


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(4, 4), (1, 1, 4, 4), (4,)])
def test_edge_mask_wrong_rank_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"labels must be 3-D \(B, H, W\), got \d-D"):
        edge_mask(torch.zeros(shape, dtype=torch.long))


def test_edge_mask_bad_types() -> None:
    with pytest.raises(ValueError, match=r"labels must hold integer class labels, got dtype torch.float32"):
        edge_mask(torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"labels must hold integer class labels, got dtype torch.bool"):
        edge_mask(torch.zeros(1, 3, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"labels must be a torch.Tensor, got list"):
        edge_mask([[[0, 1]]])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got float"):
        edge_mask(torch.zeros(1, 3, 3, dtype=torch.long), ignore_index=255.0)  # type: ignore[arg-type]


def _args() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(2, 4, 5, 6), torch.zeros(2, 5, 6, dtype=torch.long)


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"features": torch.randn(4, 5, 6)}, ValueError, r"features must be 4-D \(B, C, H, W\), got 3-D"),
        ({"features": torch.ones(2, 4, 5, 6, dtype=torch.long)}, ValueError, r"features must be a floating-point tensor"),
        ({"prediction": torch.zeros(2, 1, 5, 6, dtype=torch.long)}, ValueError, r"prediction must be 3-D \(B, H, W\), got 4-D"),
        ({"prediction": torch.zeros(2, 10, 12, dtype=torch.long)}, ValueError, r"prediction must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 10, 12\)"),
        ({"prediction": torch.zeros(1, 5, 6, dtype=torch.long)}, ValueError, r"prediction must have shape .* = \(2, 5, 6\), got \(1, 5, 6\)"),
        ({"prediction": torch.zeros(2, 5, 6)}, ValueError, r"prediction must hold integer class labels, got dtype torch.float32"),
        ({"target": torch.zeros(2, 5, 5, dtype=torch.long)}, ValueError, r"target must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 5, 5\)"),
        ({"target": torch.zeros(2, 5, 6)}, ValueError, r"target must hold integer class labels, got dtype torch.float32"),
        ({"confidence": torch.ones(2, 6, 5)}, ValueError, r"confidence must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 6, 5\)"),
        ({"confidence": torch.ones(2, 1, 5, 6)}, ValueError, r"confidence must be 3-D \(B, H, W\), got 4-D"),
        ({"confidence": torch.ones(2, 5, 6, dtype=torch.long)}, ValueError, r"confidence must be a floating-point tensor"),
        ({"confidence": torch.full((2, 5, 6), 1.5)}, ValueError, r"confidence must lie in \[0.0, 1.0\], got 60 value\(s\) outside, e.g. 1.5"),
        ({"confidence": torch.full((2, 5, 6), -0.1)}, ValueError, r"confidence must lie in \[0.0, 1.0\]"),
        ({"confidence": torch.full((2, 5, 6), float("nan"))}, ValueError, r"confidence must lie in \[0.0, 1.0\].*nan"),
        ({"num": 0}, ValueError, r"num must be a positive int, got 0"),
        ({"num": -3}, ValueError, r"num must be a positive int, got -3"),
        ({"threshold": 1.5}, ValueError, r"threshold must be in \[0.0, 1.0\], got 1.5"),
        ({"num": 2.0}, TypeError, r"num must be an int, got float"),
        ({"threshold": "high"}, TypeError, r"threshold must be a number, got str"),
        ({"generator": 0}, TypeError, r"generator must be a torch.Generator or None, got int"),
        ({"confidence": [[0.5]]}, TypeError, r"confidence must be a torch.Tensor, got list"),
        ({"target": "labels"}, TypeError, r"target must be a torch.Tensor, got str"),
        ({"ignore_index": None}, TypeError, r"ignore_index must be an int, got NoneType"),
    ],
)
def test_select_bad_input_raises(change: dict[str, object], error: type[Exception], message: str) -> None:
    features, prediction = _args()
    kwargs: dict[str, object] = {"features": features, "prediction": prediction, **change}
    with pytest.raises(error, match=message):
        select_edge_features(**kwargs)  # type: ignore[arg-type]
