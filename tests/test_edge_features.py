"""edge_mask and select_edge_features: the shared checklist (tests/op_tester.py), hand-drawn
masks and the rules of the candidate selection."""

from __future__ import annotations

import torch
from hypothesis import given
from hypothesis import strategies as st

from cscpa_layers import edge_mask, select_edge_features
from cscpa_layers._reference.edge_attention import edge_mask_dense
from tests.op_tester import BadInput, Call, Case, OpTester, RunCase

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


def _lesion(b: int = 2, h: int = 8, w: int = 8) -> torch.Tensor:
    labels = torch.zeros(b, h, w, dtype=torch.long)
    labels[:, 2:6, 3:7] = 1
    return labels


def _labels_with_ignored_rows(shape: tuple[int, int, int]) -> torch.Tensor:
    labels = torch.randint(0, 3, shape)
    labels[0, : shape[1] // 3] = I
    return labels


class TestEdgeMaskOp(OpTester):
    function = staticmethod(edge_mask)
    reference = staticmethod(edge_mask_dense)
    # the dtype of the labels: any integer dtype gives the same mask
    reference_dtypes = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)
    not_applicable = {
        "gradcheck": "integer labels in, a bool mask out: there is no gradient",
        "module": "a function only",
        "repr": "a function only",
        "state_dict": "a function only",
    }

    def bad_inputs(self) -> list[BadInput]:
        long = torch.long
        return [
            *(
                BadInput(f"rank-{len(shape)}", lambda shape=shape: edge_mask(torch.zeros(shape, dtype=long)), ValueError,
                         r"labels must be 3-D \(B, H, W\), got \d-D")
                for shape in [(4, 4), (1, 1, 4, 4), (4,)]
            ),
            BadInput("float", lambda: edge_mask(torch.zeros(1, 3, 3)), ValueError,
                     r"labels must hold integer class labels, got dtype torch.float32"),
            BadInput("bool", lambda: edge_mask(torch.zeros(1, 3, 3, dtype=torch.bool)), ValueError,
                     r"labels must hold integer class labels, got dtype torch.bool"),
            BadInput("list", lambda: edge_mask([[[0, 1]]]), TypeError, r"labels must be a torch.Tensor, got list"),  # type: ignore[arg-type]
            BadInput("ignore_index-float", lambda: edge_mask(torch.zeros(1, 3, 3, dtype=long), ignore_index=255.0),  # type: ignore[arg-type]
                     TypeError, r"ignore_index must be an int, got float"),
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"label-maps": label_maps().map(lambda case: Call((case[0],), {"ignore_index": case[1]}))}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        labels, ignore_index = call.args[0], call.kwargs["ignore_index"]
        assert out.shape == labels.shape and out.dtype == torch.bool
        assert not (out & (labels == ignore_index)).any()  # an ignored pixel is never an edge

    def reference_cases(self) -> list[Case]:
        # values that every integer dtype holds (int8 stops at 127): 0, 1, 2 and 100 ignored
        def random(dtype: torch.dtype) -> Call:
            labels = torch.randint(0, 3, (2, 6, 7))
            labels[0, :2] = 100
            return Call((labels.to(dtype),), {"ignore_index": 100})

        return [
            Case("two-classes", lambda dtype: Call((_mask([[0, 0, 1], [0, 0, 0]]).to(dtype),))),
            Case("three-classes-and-ignored", random),
        ]

    def compile_cases(self) -> list[RunCase]:
        return [RunCase("ignored-rows", lambda: (edge_mask, Call((_labels_with_ignored_rows((2, 7, 9)),))))]

    def device_cases(self) -> list[RunCase]:
        return [RunCase("ignored-rows", lambda: (edge_mask, Call((_labels_with_ignored_rows((3, 9, 11)),))))]

    def degenerate_cases(self) -> list[Case]:
        def no_edge(call: Call, out: torch.Tensor) -> None:
            assert not out.any()

        def both_edges(call: Call, out: torch.Tensor) -> None:
            assert out.tolist() == [[[True, True]]]

        return [
            Case("1x1", lambda: Call((torch.tensor([[[1]]]),)), shape=(1, 1, 1), reference=True, check=no_edge),
            Case("1x2-two-classes", lambda: Call((torch.tensor([[[0, 1]]]),)), reference=True, check=both_edges),
            Case("empty-batch", lambda: Call((torch.zeros(0, 4, 4, dtype=torch.long),)), shape=(0, 4, 4), reference=True),
            Case("zero-height", lambda: Call((torch.zeros(2, 0, 4, dtype=torch.long),)), shape=(2, 0, 4), reference=True),
            Case("one-class", lambda: Call((torch.ones(2, 5, 4, dtype=torch.long),)), reference=True, check=no_edge),
            Case("all-ignored", lambda: Call((torch.full((2, 5, 4), I, dtype=torch.long),)), reference=True, check=no_edge),
            Case("odd-batch", lambda: Call((_labels_with_ignored_rows((3, 5, 5)),)), shape=(3, 5, 5), reference=True),
        ]


def _select_bad_input(**change: object) -> object:
    arguments: dict[str, object] = {"features": torch.randn(2, 4, 5, 6), "prediction": torch.zeros(2, 5, 6, dtype=torch.long),
                                    **change}
    return select_edge_features(**arguments)  # type: ignore[arg-type]


@st.composite
def select_calls(draw: st.DrawFn) -> Call:
    labels, _ = draw(label_maps())
    c = draw(st.integers(1, 6))
    num = draw(st.integers(1, 50))
    b, h, w = labels.shape
    return Call((torch.randn(b, c, h, w), labels.clamp(0, 1)), {"num": num})


class TestSelectEdgeFeaturesOp(OpTester):
    function = staticmethod(select_edge_features)
    not_applicable = {
        "reference": "a random draw: test_select_* check the drawn rows against edge_mask instead",
        "gradcheck": "the rows are an index copy in a random order; test_selected_rows_stay_in_the_graph checks "
                     "where the gradient goes",
        "module": "a function only",
        "repr": "a function only",
        "state_dict": "a function only",
        "compile": "the row count is data-dependent: documented as not for torch.compile(fullgraph=True)",
    }

    def bad_inputs(self) -> list[BadInput]:
        cases = [
            ("features-rank", {"features": torch.randn(4, 5, 6)}, ValueError, r"features must be 4-D \(B, C, H, W\), got 3-D"),
            ("features-integer", {"features": torch.ones(2, 4, 5, 6, dtype=torch.long)}, ValueError, r"features must be a floating-point tensor"),
            ("prediction-rank", {"prediction": torch.zeros(2, 1, 5, 6, dtype=torch.long)}, ValueError, r"prediction must be 3-D \(B, H, W\), got 4-D"),
            ("prediction-size", {"prediction": torch.zeros(2, 10, 12, dtype=torch.long)}, ValueError, r"prediction must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 10, 12\)"),
            ("prediction-batch", {"prediction": torch.zeros(1, 5, 6, dtype=torch.long)}, ValueError, r"prediction must have shape .* = \(2, 5, 6\), got \(1, 5, 6\)"),
            ("prediction-float", {"prediction": torch.zeros(2, 5, 6)}, ValueError, r"prediction must hold integer class labels, got dtype torch.float32"),
            ("target-size", {"target": torch.zeros(2, 5, 5, dtype=torch.long)}, ValueError, r"target must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 5, 5\)"),
            ("target-float", {"target": torch.zeros(2, 5, 6)}, ValueError, r"target must hold integer class labels, got dtype torch.float32"),
            ("confidence-size", {"confidence": torch.ones(2, 6, 5)}, ValueError, r"confidence must have shape \(B, H, W\) of features = \(2, 5, 6\), got \(2, 6, 5\)"),
            ("confidence-rank", {"confidence": torch.ones(2, 1, 5, 6)}, ValueError, r"confidence must be 3-D \(B, H, W\), got 4-D"),
            ("confidence-integer", {"confidence": torch.ones(2, 5, 6, dtype=torch.long)}, ValueError, r"confidence must be a floating-point tensor"),
            ("confidence-above-1", {"confidence": torch.full((2, 5, 6), 1.5)}, ValueError, r"confidence must lie in \[0.0, 1.0\], got 60 value\(s\) outside, e.g. 1.5"),
            ("confidence-below-0", {"confidence": torch.full((2, 5, 6), -0.1)}, ValueError, r"confidence must lie in \[0.0, 1.0\]"),
            ("confidence-nan", {"confidence": torch.full((2, 5, 6), float("nan"))}, ValueError, r"confidence must lie in \[0.0, 1.0\].*nan"),
            ("num-0", {"num": 0}, ValueError, r"num must be a positive int, got 0"),
            ("num-negative", {"num": -3}, ValueError, r"num must be a positive int, got -3"),
            ("threshold", {"threshold": 1.5}, ValueError, r"threshold must be in \[0.0, 1.0\], got 1.5"),
            ("num-float", {"num": 2.0}, TypeError, r"num must be an int, got float"),
            ("threshold-str", {"threshold": "high"}, TypeError, r"threshold must be a number, got str"),
            ("generator", {"generator": 0}, TypeError, r"generator must be a torch.Generator or None, got int"),
            ("confidence-list", {"confidence": [[0.5]]}, TypeError, r"confidence must be a torch.Tensor, got list"),
            ("target-str", {"target": "labels"}, TypeError, r"target must be a torch.Tensor, got str"),
            ("ignore_index-none", {"ignore_index": None}, TypeError, r"ignore_index must be an int, got NoneType"),
        ]
        return [BadInput(name, lambda c=change: _select_bad_input(**c), error, message) for name, change, error, message in cases]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"label-maps": select_calls()}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        feats, prediction = call.args
        count = int(edge_mask(prediction).sum())
        assert out.shape == (min(call.kwargs["num"], count), feats.shape[1])
        assert out.dtype == feats.dtype

    def device_cases(self) -> list[RunCase]:
        def ids(out: torch.Tensor, expected: torch.Tensor) -> None:
            # every candidate is drawn (num > #candidates): the same set, in some order
            assert sorted(out[:, 0].long().tolist()) == sorted(expected[:, 0].long().tolist())
            assert out.shape[0] == int(edge_mask(_lesion()).sum())

        def build(device: str) -> tuple[object, Call]:  # the draw runs on the generator's device
            return select_edge_features, Call((_pixel_ids(2, 3, 8, 8), _lesion()), {"num": 1000, "generator": torch.Generator(device)})

        return [RunCase(f"{device}-generator", lambda d=device: build(d), compare=ids) for device in ("cuda", "cpu")]  # type: ignore[arg-type,return-value]

    def degenerate_cases(self) -> list[Case]:
        def some_rows(call: Call, out: torch.Tensor) -> None:
            assert out.shape[0] > 0  # (and finite, as every degenerate output)

        def every_candidate(call: Call, out: torch.Tensor) -> None:
            features, prediction = call.args
            assert out.shape == (int(edge_mask(prediction).sum()), features.shape[1])

        return [
            Case("all-ignored", lambda: Call((torch.randn(2, 4, 5, 5), torch.full((2, 5, 5), I))), shape=(0, 4)),
            Case("1x1", lambda: Call((torch.randn(3, 4, 1, 1), torch.ones(3, 1, 1, dtype=torch.long))), shape=(0, 4)),
            Case("empty-batch", lambda: Call((torch.randn(0, 4, 5, 5), torch.zeros(0, 5, 5, dtype=torch.long))), shape=(0, 4)),
            Case("zero-features", lambda: Call((torch.zeros(2, 4, 8, 8, requires_grad=True), _lesion())), check=some_rows),
            Case("nothing-confident", lambda: Call((torch.randn(2, 4, 5, 5), _lesion(2, 5, 5)), {"confidence": torch.zeros(2, 5, 5)}),
                 shape=(0, 4)),
            Case("odd-batch", lambda: Call((torch.randn(3, 4, 8, 8), _lesion(3)), {"num": 1000}), check=every_candidate),
        ]


# --- edge_mask: hand-drawn masks --------------------------------------------------------------


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


@given(label_maps())
def test_binary_edges_are_symmetric_in_the_two_classes(case: tuple[torch.Tensor, int]) -> None:
    labels, _ = case
    binary = labels.clamp(0, 1)
    assert torch.equal(edge_mask(binary), edge_mask(1 - binary))


# --- select_edge_features: which rows, how many, in which graph ------------------------------------


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
