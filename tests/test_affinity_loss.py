"""PixelAffinityLoss and pixel_affinity: the style-rule-12 checklist, against the dense reference."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import cscpa_layers._neighbour_cosine as neighbour_cosine_module
from cscpa_layers import NEIGHBOUR_OFFSETS, PixelAffinityLoss, pixel_affinity, pixel_affinity_loss
from cscpa_layers._reference.affinity_loss import pixel_affinity_dense, pixel_affinity_loss_dense
from tests.conftest import DEVICES, TOLERANCES, compile_available

def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the shared tolerances for ``dtype``."""
    torch.testing.assert_close(actual, expected, atol=TOLERANCES[dtype]["atol"], rtol=TOLERANCES[dtype]["rtol"])


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _case(
    b: int, c: int, h: int, w: int, *, pseudo: bool, dtype: torch.dtype = torch.float64, seed: int = 0
) -> Case:
    """Features, labels {0, 1, 2, 255}, a confidence map (pseudo form) and target features."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    target = torch.randint(0, 3, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < 0.1] = 255
    confidence = torch.rand(b, h, w, generator=gen, dtype=dtype) if pseudo else None
    target_features = torch.randn(b, c, h, w, generator=gen, dtype=dtype) if pseudo else None
    return features, target, confidence, target_features


@st.composite
def pal_cases(draw: st.DrawFn) -> tuple[Case, str, float]:
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    pseudo = draw(st.booleans())
    reduction = draw(st.sampled_from(["mean", "sum", "none"]))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.8]))
    return _case(b, c, h, w, pseudo=pseudo, seed=draw(st.integers(0, 2**16))), reduction, threshold


def _fast(case: Case, **kwargs: object) -> torch.Tensor:
    features, target, confidence, target_features = case
    return pixel_affinity_loss(features, target, confidence=confidence, target_features=target_features, **kwargs)  # type: ignore[arg-type]


def _dense(case: Case, **kwargs: object) -> torch.Tensor:
    features, target, confidence, target_features = case
    return pixel_affinity_loss_dense(features, target, confidence, target_features, **kwargs)  # type: ignore[arg-type]


# --- smoke and shapes -----------------------------------------------------------------------


def test_smoke() -> None:
    features = torch.randn(2, 16, 9, 9, requires_grad=True)
    target = (torch.rand(2, 9, 9) > 0.5).long()
    loss = PixelAffinityLoss()(features, target)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32 and loss > 0
    assert features.grad is not None and torch.isfinite(features.grad).all()


@given(pal_cases())
def test_shape_and_reference_property(drawn: tuple[Case, str, float]) -> None:
    case, reduction, threshold = drawn
    features, target, _, _ = case
    out = _fast(case, reduction=reduction, threshold=threshold)
    assert out.shape == (target.shape if reduction == "none" else ())
    assert out.dtype == features.dtype
    assert torch.isfinite(out).all() and (out >= 0).all()
    torch.testing.assert_close(out, _dense(case, reduction=reduction, threshold=threshold))


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 6),
    h=st.integers(1, 10),
    w=st.integers(1, 10),
)
def test_pixel_affinity_shapes_and_normalisation(b: int, c: int, h: int, w: int) -> None:
    features = torch.randn(b, c, h, w, dtype=torch.float64)
    valid = torch.rand(b, h, w) > 0.2
    aff = pixel_affinity(features, valid)
    for field in aff:
        assert field.shape == (b, 8, h, w)
    assert aff.valid.dtype == torch.bool
    assert not aff.weights[~aff.valid].any() and not aff.cosine[~aff.valid].any()
    # L1-normalised: |N1| sums to 1 wherever a valid neighbour exists (random features: s != 0)
    has_neighbour = aff.valid.any(1)
    torch.testing.assert_close(aff.weights.abs().sum(1)[has_neighbour], torch.ones(int(has_neighbour.sum()), dtype=torch.float64))
    cosine, weights, pair_valid = pixel_affinity_dense(features, valid)
    torch.testing.assert_close(aff.cosine, cosine)
    torch.testing.assert_close(aff.weights, weights)
    assert torch.equal(aff.valid, pair_valid)


# --- hand-computed values -------------------------------------------------------------------


def test_neighbour_axis_follows_the_offsets() -> None:
    # A 3x3 image whose pixels are one-hot feature vectors: cos = 1 only with itself, so give the
    # centre the feature of exactly one neighbour and read which slot lights up.
    assert NEIGHBOUR_OFFSETS == ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
    for slot, (dy, dx) in enumerate(NEIGHBOUR_OFFSETS):
        features = torch.eye(9).view(9, 3, 3).unsqueeze(0).clone()  # pixel i has feature e_i
        features[0, :, 1, 1] = features[0, :, 1 + dy, 1 + dx]
        cosine = pixel_affinity(features).cosine[0, :, 1, 1]
        assert cosine.tolist() == [1.0 if k == slot else 0.0 for k in range(8)]


def test_constant_features_give_uniform_weights_and_corner_counts() -> None:
    aff = pixel_affinity(torch.ones(1, 3, 3, 4))
    assert aff.valid[0].sum(0).tolist() == [[3, 5, 5, 3], [5, 8, 8, 5], [3, 5, 5, 3]]
    torch.testing.assert_close(aff.weights[0, :, 1, 1], torch.full((8,), 1 / 8))
    torch.testing.assert_close(aff.weights[0, :, 0, 0][aff.valid[0, :, 0, 0]], torch.full((3,), 1 / 3))


def test_signed_weights_use_the_l1_norm() -> None:
    # pixels (1, 0), (-1, 0), (0, 1): the middle one sees cos -1 (left) and 0 (right)
    features = torch.tensor([[[[1.0, -1.0, 0.0]], [[0.0, 0.0, 1.0]]]])
    aff = pixel_affinity(features)
    left, right = 3, 4  # slots of (0, -1) and (0, 1)
    assert aff.cosine[0, left, 0, 1] == -1 and aff.cosine[0, right, 0, 1] == 0
    assert aff.weights[0, left, 0, 1] == -1  # -1 / (|-1| + |0|); the signed sum would give -1 too
    assert aff.weights[0, left, 0, 2] == 0 and aff.weights[0, right, 0, 0] == -1


def test_hand_computed_loss_on_a_three_pixel_row() -> None:
    # features a = (1, 0), b = (1, 0), c = (0, 1); labels 0, 0, 1
    features = torch.tensor([[[[1.0, 1.0, 0.0]], [[0.0, 0.0, 1.0]]]], dtype=torch.float64)
    target = torch.tensor([[[0, 0, 1]]])
    eps = 1e-6

    def kl(q_t: float, q_p: float) -> float:
        return q_t * math.log(q_t / q_p) + (1 - q_t) * math.log((1 - q_t) / (1 - q_p))

    # pixel 0: one bg neighbour with s = 1: G = -1, Ĝ = -1
    # pixel 1: bg neighbour (s = 1) and fg neighbour (s = 0): G = 0, Ĝ = -1
    # pixel 2: one bg neighbour with s = 0: G = -1, Ĝ = 0
    expected = [kl(eps, eps), kl(0.5, eps), kl(eps, 0.5)]
    out = pixel_affinity_loss(features, target, reduction="none", eps=eps)
    torch.testing.assert_close(out[0, 0], torch.tensor(expected, dtype=torch.float64))
    torch.testing.assert_close(pixel_affinity_loss(features, target), torch.tensor(sum(expected) / 3, dtype=torch.float64))
    torch.testing.assert_close(pixel_affinity_loss(features, target, reduction="sum"), torch.tensor(sum(expected), dtype=torch.float64))


def test_loss_is_zero_when_predicted_affinities_equal_the_target() -> None:
    # constant features inside a single-class region: Ĝ = G = -1 everywhere
    features = torch.ones(2, 4, 5, 5, requires_grad=True)
    target = torch.zeros(2, 5, 5, dtype=torch.long)
    assert pixel_affinity_loss(features, target).item() == 0.0
    # the GT form has equal weights, so constant features match it on any label map
    target[:, 1:4, 2:] = 1
    torch.testing.assert_close(pixel_affinity_loss(features, target), torch.tensor(0.0), atol=1e-6, rtol=0)
    # pseudo-label form with the prediction's own features as targets: identical sides
    random = torch.randn(2, 4, 5, 5)
    confidence = torch.rand(2, 5, 5)
    assert pixel_affinity_loss(random, target, confidence=confidence, threshold=0.3, target_features=random).item() == 0.0


def test_positive_at_a_boundary_and_decreasing_under_optimisation() -> None:
    target = torch.zeros(1, 6, 6, dtype=torch.long)
    target[:, :, 3:] = 1  # a vertical boundary
    features = torch.randn(1, 4, 6, 6, requires_grad=True)
    per_pixel = pixel_affinity_loss(features.detach(), target, reduction="none")
    assert (per_pixel[0, :, 2:4] > 0).all()  # the two columns at the boundary
    optimiser = torch.optim.Adam([features], lr=0.05)
    losses = []
    for _ in range(30):
        loss = pixel_affinity_loss(features, target)
        losses.append(loss.item())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert losses[0] > 0
    assert losses[-1] < 0.5 * losses[0]
    assert all(later <= earlier + 1e-6 for earlier, later in zip(losses, losses[5:]))


def test_confidence_excludes_pixels_as_centre_and_neighbour() -> None:
    features, target, _, _ = _case(1, 4, 5, 5, pseudo=False)
    confidence = torch.ones(1, 5, 5, dtype=torch.float64)
    confidence[0, 2, 2] = 0.5
    out = pixel_affinity_loss(features, target, confidence=confidence, reduction="none")
    assert out[0, 2, 2] == 0  # not a centre
    # as a neighbour: the same as ignoring it
    ignored = target.clone()
    ignored[0, 2, 2] = 255
    torch.testing.assert_close(out, pixel_affinity_loss(features, ignored, reduction="none"))
    # and a pixel exactly at the threshold counts (confidence >= tau)
    confidence[0, 2, 2] = 0.8
    assert pixel_affinity_loss(features, target, confidence=confidence, reduction="none")[0, 2, 2] > 0


def test_mean_is_over_counted_pixels_only() -> None:
    features, target, _, _ = _case(2, 3, 6, 6, pseudo=False)
    target[1] = 255
    per_pixel = pixel_affinity_loss(features, target, reduction="none")
    counted = (target != 255).sum()  # every non-ignored pixel here has a valid neighbour
    torch.testing.assert_close(pixel_affinity_loss(features, target), per_pixel.sum() / counted)


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("pseudo", [False, True], ids=["gt", "pseudo"])
def test_gradcheck(pseudo: bool) -> None:
    features, target, confidence, target_features = _case(2, 3, 4, 5, pseudo=pseudo)
    features.requires_grad_()

    def fn(x: torch.Tensor) -> torch.Tensor:
        return pixel_affinity_loss(x, target, confidence=confidence, target_features=target_features, threshold=0.3)

    assert torch.autograd.gradcheck(fn, (features,))
    assert torch.autograd.gradcheck(lambda x: pixel_affinity(x, target != 255).weights, (features,))


@pytest.mark.parametrize("pseudo", [False, True], ids=["gt", "pseudo"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_dense_in_value_and_gradient(pseudo: bool, reduction: str, dtype: torch.dtype) -> None:
    case = _case(3, 16, 9, 11, pseudo=pseudo, dtype=dtype)
    features = case[0].requires_grad_()
    out = _fast(case, reduction=reduction, threshold=0.4)
    ref = _dense(case, reduction=reduction, threshold=0.4)
    upstream = torch.rand_like(out)
    _close(out, ref, dtype)
    grad = torch.autograd.grad(out, features, upstream)[0]
    ref_grad = torch.autograd.grad(ref, features, upstream)[0]
    _close(grad, ref_grad, dtype)


@pytest.mark.parametrize("chunk", [1, 7, 40, 300, 10**7])
def test_every_chunking_gives_the_same_value_and_gradient(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # chunks of several images, of a few channels of one image, and of one channel
    case = _case(3, 5, 4, 6, pseudo=True)
    features = case[0].requires_grad_()
    ref = _dense(case)
    ref_grad = torch.autograd.grad(ref, features)[0]
    monkeypatch.setattr(neighbour_cosine_module, "_CPU_CHUNK", chunk)
    out = _fast(case)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(torch.autograd.grad(out, features)[0], ref_grad)


def test_target_side_receives_no_gradient() -> None:
    features, target, confidence, target_features = _case(2, 4, 5, 5, pseudo=True)
    features.requires_grad_()
    assert target_features is not None and confidence is not None
    target_features.requires_grad_()
    confidence.requires_grad_()
    loss = pixel_affinity_loss(features, target, confidence=confidence, target_features=target_features, threshold=0.3)
    grads = torch.autograd.grad(loss, [features, target_features, confidence], allow_unused=True)
    assert grads[0] is not None and grads[0].abs().sum() > 0
    assert grads[1] is None and grads[2] is None


def test_target_features_equal_to_features_still_train_the_prediction_side() -> None:
    # the same tensor on both sides: the target side is detached, the prediction side is not
    features = torch.randn(1, 4, 5, 5, requires_grad=True)
    target = (torch.rand(1, 5, 5) > 0.5).long()
    other = torch.randn(1, 4, 5, 5)
    loss = pixel_affinity_loss(features, target, target_features=other)
    loss.backward()
    assert features.grad is not None and features.grad.abs().sum() > 0


# --- degenerate input -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["ignored", "unconfident", "one_pixel", "isolated"])
@pytest.mark.parametrize("pseudo", [False, True], ids=["gt", "pseudo"])
def test_no_valid_pixel_gives_exact_zero_with_finite_gradient(how: str, pseudo: bool) -> None:
    size = (1, 1) if how == "one_pixel" else (4, 4)
    features = torch.randn(2, 3, *size, requires_grad=True)
    target = torch.ones(2, *size, dtype=torch.long)
    confidence = torch.ones(2, *size)
    if how == "ignored":
        target.fill_(255)
    elif how == "unconfident":
        confidence.fill_(0.5)
    elif how == "isolated":  # one valid pixel, all its neighbours ignored
        target.fill_(255)
        target[:, 1, 1] = 1
    target_features = torch.randn(2, 3, *size) if pseudo else None
    for reduction in ("mean", "sum"):
        loss = pixel_affinity_loss(features, target, confidence=confidence, target_features=target_features, reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        grad = torch.autograd.grad(loss, features)[0]
        assert torch.isfinite(grad).all() and not grad.any()
    none = pixel_affinity_loss(features, target, confidence=confidence, reduction="none")
    assert not none.any()


@pytest.mark.parametrize("pseudo", [False, True], ids=["gt", "pseudo"])
def test_zero_features_never_give_inf_or_nan(pseudo: bool) -> None:
    features = torch.zeros(2, 4, 5, 5, requires_grad=True)
    target = (torch.rand(2, 5, 5) > 0.5).long()
    target_features = torch.zeros(2, 4, 5, 5) if pseudo else None
    for reduction in ("mean", "sum", "none"):
        loss = pixel_affinity_loss(features, target, target_features=target_features, reduction=reduction)
        assert torch.isfinite(loss).all()
        grad = torch.autograd.grad(loss.sum(), features)[0]
        assert torch.isfinite(grad).all()


def test_partly_zero_and_huge_features_stay_finite() -> None:
    features = 1e15 * torch.randn(2, 4, 6, 6)
    features[:, :, :3] = 0
    features.requires_grad_()
    target = (torch.rand(2, 6, 6) > 0.5).long()
    loss = pixel_affinity_loss(features, target, target_features=features.detach() * 1e-20)
    loss.backward()
    assert torch.isfinite(loss) and features.grad is not None and torch.isfinite(features.grad).all()


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0), (2, 0, 3, 3)])
def test_empty_inputs(shape: tuple[int, int, int, int]) -> None:
    b, c, h, w = shape
    features = torch.randn(*shape, requires_grad=True)
    target = torch.zeros(b, h, w, dtype=torch.long)
    confidence = torch.ones(b, h, w)
    loss = pixel_affinity_loss(features, target, confidence=confidence, target_features=torch.randn(*shape))
    assert loss.item() == 0.0
    loss.backward()
    assert features.grad is not None and features.grad.shape == features.shape
    assert pixel_affinity_loss(features, target, reduction="none").shape == (b, h, w)


def test_lines_and_odd_batches_match_dense() -> None:
    for shape in [(3, 4, 1, 7), (1, 4, 7, 1), (5, 2, 2, 2)]:
        case = _case(*shape, pseudo=True)
        features = case[0].requires_grad_()
        out, ref = _fast(case, threshold=0.2), _dense(case, threshold=0.2)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(torch.autograd.grad(out, features)[0], torch.autograd.grad(ref, features)[0])


def test_bfloat16_features_give_a_float32_loss_close_to_float64() -> None:
    case = _case(2, 8, 6, 6, pseudo=True)
    low = tuple(t.bfloat16() if t is not None and t.is_floating_point() else t for t in case)
    features = low[0].requires_grad_()  # type: ignore[union-attr]
    out = _fast(low)  # type: ignore[arg-type]
    out.backward()
    assert out.dtype == torch.float32 and features.grad is not None and features.grad.dtype == torch.bfloat16
    reference = _dense(tuple(t.double() if t is not None and t.is_floating_point() else t for t in low))  # type: ignore[arg-type]
    _close(out.double(), reference, torch.bfloat16)


# --- module and compilation -------------------------------------------------------------------


def test_module_equals_function() -> None:
    case = _case(2, 5, 6, 7, pseudo=True)
    features, target, confidence, target_features = case
    layer = PixelAffinityLoss(threshold=0.5, ignore_index=2, reduction="sum", eps=1e-5)
    out = layer(features, target, confidence=confidence, target_features=target_features)
    expected = pixel_affinity_loss(
        features, target, confidence=confidence, target_features=target_features,
        threshold=0.5, ignore_index=2, reduction="sum", eps=1e-5,
    )
    assert torch.equal(out, expected)


def test_extra_repr_shows_every_hyper_parameter() -> None:
    text = repr(PixelAffinityLoss(threshold=0.5, ignore_index=-1, reduction="sum", eps=1e-5))
    for part in ("threshold=0.5", "ignore_index=-1", "reduction='sum'", "eps=1e-05"):
        assert part in text


def test_negative_ignore_index_is_ignored() -> None:
    features, target, _, _ = _case(1, 3, 5, 5, pseudo=False)
    moved = torch.where(target == 255, -100, target)
    torch.testing.assert_close(
        pixel_affinity_loss(features, moved, ignore_index=-100), pixel_affinity_loss(features, target)
    )


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_compiled_equals_eager() -> None:
    layer = PixelAffinityLoss(threshold=0.3)

    def both_forms(x: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, target_x: torch.Tensor) -> torch.Tensor:
        return layer(x, target) + layer(x, target, confidence=confidence, target_features=target_x)

    features, target, confidence, target_features = _case(2, 6, 5, 7, pseudo=True, dtype=torch.float32)
    assert confidence is not None and target_features is not None
    features.requires_grad_()
    eager = both_forms(features, target, confidence, target_features)
    eager_grad = torch.autograd.grad(eager, features)[0]
    compiled = torch.compile(both_forms, fullgraph=True)
    out = compiled(features, target, confidence, target_features)
    grad = torch.autograd.grad(out, features)[0]
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, eager_grad, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("pseudo", [False, True], ids=["gt", "pseudo"])
def test_cuda_equals_cpu(pseudo: bool) -> None:
    case = _case(3, 32, 17, 13, pseudo=pseudo, dtype=torch.float32)
    features = case[0].requires_grad_()
    out = _fast(case, threshold=0.3)
    grad = torch.autograd.grad(out, features)[0]
    cuda_case = tuple(t.cuda() if t is not None else None for t in case)
    cuda_features = cuda_case[0].detach().requires_grad_()  # type: ignore[union-attr]
    cuda_out = _fast((cuda_features, *cuda_case[1:]), threshold=0.3)  # type: ignore[arg-type]
    cuda_grad = torch.autograd.grad(cuda_out, cuda_features)[0]
    torch.testing.assert_close(cuda_out.cpu(), out, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cuda_grad.cpu(), grad, atol=1e-5, rtol=1e-4)


# --- bad input --------------------------------------------------------------------------------


def _good() -> dict[str, torch.Tensor]:
    return {
        "features": torch.randn(2, 3, 4, 5),
        "target": torch.zeros(2, 4, 5, dtype=torch.long),
        "confidence": torch.rand(2, 4, 5),
        "target_features": torch.randn(2, 3, 4, 5),
    }


@pytest.mark.parametrize(
    ("name", "bad", "message"),
    [
        ("target", torch.zeros(2, 4, 4, dtype=torch.long), r"target must have shape \(B, H, W\) of features = \(2, 4, 5\), got \(2, 4, 4\)"),
        ("target", torch.zeros(1, 4, 5, dtype=torch.long), r"target must have shape .* = \(2, 4, 5\), got \(1, 4, 5\)"),
        ("target", torch.zeros(2, 1, 4, 5, dtype=torch.long), r"target must have shape .* got \(2, 1, 4, 5\)"),
        ("target", torch.zeros(2, 4, 5), r"target must hold integer class labels, got dtype torch.float32"),
        ("target", torch.full((2, 4, 5), -1), r"target must hold class labels >= 0 or ignore_index=255, got 40 other"),
        ("confidence", torch.rand(2, 5, 4), r"confidence must have shape \(B, H, W\) of features = \(2, 4, 5\), got \(2, 5, 4\)"),
        ("confidence", torch.full((2, 4, 5), 1.5), r"confidence must lie in \[0.0, 1.0\], got 40 value\(s\) outside, e.g. 1.5"),
        ("confidence", torch.full((2, 4, 5), -0.1), r"confidence must lie in \[0.0, 1.0\]"),
        ("confidence", torch.full((2, 4, 5), float("nan")), r"confidence must lie in \[0.0, 1.0\].*nan"),
        ("confidence", torch.ones(2, 4, 5, dtype=torch.long), r"confidence must be a floating-point tensor"),
        ("target_features", torch.randn(2, 3, 4, 4), r"target_features must have shape \(B, C, H, W\) of features = \(2, 3, 4, 5\), got \(2, 3, 4, 4\)"),
        ("target_features", torch.randn(2, 4, 4, 5), r"target_features must have shape .* got \(2, 4, 4, 5\)"),
        ("features", torch.randn(2, 4, 5), r"features must be 4-D \(B, C, H, W\), got 3-D"),
        ("features", torch.ones(2, 3, 4, 5, dtype=torch.long), r"features must be a floating-point tensor"),
    ],
)
def test_bad_tensors_raise(name: str, bad: torch.Tensor, message: str) -> None:
    inputs = _good()
    inputs[name] = bad
    with pytest.raises(ValueError, match=message):
        PixelAffinityLoss()(
            inputs["features"], inputs["target"], confidence=inputs["confidence"], target_features=inputs["target_features"]
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"reduction": "xyz"}, r"reduction must be one of 'none', 'mean', 'sum', got 'xyz'"),
        ({"threshold": 1.5}, r"threshold must be in \[0.0, 1.0\], got 1.5"),
        ({"eps": 0.0}, r"eps must be in \(0.0, 0.5\], got 0.0"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PixelAffinityLoss(**kwargs)  # type: ignore[arg-type]
    inputs = _good()
    with pytest.raises(ValueError, match=message):
        pixel_affinity_loss(inputs["features"], inputs["target"], **kwargs)  # type: ignore[arg-type]


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"ignore_index must be an int, got float"):
        PixelAffinityLoss(ignore_index=255.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"target must be a torch.Tensor, got list"):
        PixelAffinityLoss()(torch.randn(1, 2, 2, 2), [[0, 1], [1, 0]])


def test_pixel_affinity_checks_the_valid_map() -> None:
    with pytest.raises(ValueError, match=r"valid must be a bool tensor, got dtype torch.int64"):
        pixel_affinity(torch.randn(1, 2, 3, 3), torch.ones(1, 3, 3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"valid must have shape \(B, H, W\) = \(1, 3, 3\), got \(1, 3, 4\)"):
        pixel_affinity(torch.randn(1, 2, 3, 3), torch.ones(1, 3, 4, dtype=torch.bool))


def test_autocast_bfloat16_runs_and_backpropagates() -> None:
    # the loss is elementwise work autocast leaves alone, and the cosines run with autocast off,
    # so the result equals the float32 one
    case = _case(2, 8, 6, 6, pseudo=True, dtype=torch.float32)
    features = case[0].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _fast(case)
    grad = torch.autograd.grad(out, features)[0]
    assert out.dtype == torch.float32 and grad.dtype == torch.float32
    torch.testing.assert_close(out, _fast(case))
    torch.testing.assert_close(grad, torch.autograd.grad(_fast(case), features)[0])
