"""PixelAffinityLoss and pixel_affinity: the shared checklist (tests/op_tester.py) and PAL's own
hand-computed values and rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

import cscpa_layers._neighbour_cosine as neighbour_cosine_module
from cscpa_layers import NEIGHBOUR_OFFSETS, PixelAffinityLoss, pixel_affinity, pixel_affinity_loss
from cscpa_layers._reference.affinity_loss import pixel_affinity_dense, pixel_affinity_loss_dense
from tests.conftest import TOLERANCES
from tests.op_tester import BadInput, Call, Case, ModuleCase, OpTester, ReprCase, RunCase

REDUCTIONS = ("mean", "sum", "none")


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    """assert_close with the shared tolerances for ``dtype``."""
    torch.testing.assert_close(actual, expected, atol=TOLERANCES[dtype]["atol"], rtol=TOLERANCES[dtype]["rtol"])


Case4 = tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _case(
    b: int, c: int, h: int, w: int, *, pseudo: bool, dtype: torch.dtype = torch.float64, seed: int = 0
) -> Case4:
    """Features, labels {0, 1, 2, 255}, a confidence map (pseudo form) and target features."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(b, c, h, w, generator=gen, dtype=dtype)
    target = torch.randint(0, 3, (b, h, w), generator=gen)
    target[torch.rand(b, h, w, generator=gen) < 0.1] = 255
    confidence = torch.rand(b, h, w, generator=gen, dtype=dtype) if pseudo else None
    target_features = torch.randn(b, c, h, w, generator=gen, dtype=dtype) if pseudo else None
    return features, target, confidence, target_features


def _fast(case: Case4, **kwargs: object) -> torch.Tensor:
    features, target, confidence, target_features = case
    return pixel_affinity_loss(features, target, confidence=confidence, target_features=target_features, **kwargs)  # type: ignore[arg-type]


def _dense(case: Case4, **kwargs: object) -> torch.Tensor:
    features, target, confidence, target_features = case
    return pixel_affinity_loss_dense(features, target, confidence, target_features, **kwargs)  # type: ignore[arg-type]


def _loss_call(case: Case4, *, grad: bool = True, **kwargs: object) -> Call:
    """The call of pixel_affinity_loss on a case; the features (only) require grad."""
    features, target, confidence, target_features = case
    options = {"confidence": confidence, "target_features": target_features, **kwargs}
    return Call((features.requires_grad_(grad), target), options)


@st.composite
def pal_calls(draw: st.DrawFn) -> Call:
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 8))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    pseudo = draw(st.booleans())
    reduction = draw(st.sampled_from(REDUCTIONS))
    threshold = draw(st.sampled_from([0.0, 0.3, 0.8]))
    case = _case(b, c, h, w, pseudo=pseudo, seed=draw(st.integers(0, 2**16)))
    return _loss_call(case, grad=False, reduction=reduction, threshold=threshold)


def _good() -> dict[str, torch.Tensor]:
    return {
        "features": torch.randn(2, 3, 4, 5),
        "target": torch.zeros(2, 4, 5, dtype=torch.long),
        "confidence": torch.rand(2, 4, 5),
        "target_features": torch.randn(2, 3, 4, 5),
    }


def _module_with(name: str, bad: torch.Tensor) -> object:
    inputs = {**_good(), name: bad}
    return PixelAffinityLoss()(
        inputs["features"], inputs["target"], confidence=inputs["confidence"], target_features=inputs["target_features"]
    )


def _no_valid_pixel(how: str, pseudo: bool) -> Call:
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
    return Call((features, target), {"confidence": confidence, "target_features": target_features})


def _exact_zero_with_zero_gradient(call: Call, out: torch.Tensor) -> None:
    features, target = call.args
    for reduction in ("mean", "sum"):
        loss = pixel_affinity_loss(features, target, **call.kwargs, reduction=reduction)
        assert loss.item() == 0.0 and loss.requires_grad
        grad = torch.autograd.grad(loss, features)[0]
        assert torch.isfinite(grad).all() and not grad.any()
    none = pixel_affinity_loss(features, target, confidence=call.kwargs["confidence"], reduction="none")
    assert not none.any()


def _finite_in_every_reduction(call: Call, out: torch.Tensor) -> None:
    features, target = call.args
    for reduction in REDUCTIONS:
        loss = pixel_affinity_loss(features, target, **call.kwargs, reduction=reduction)
        assert torch.isfinite(loss).all()
        assert torch.isfinite(torch.autograd.grad(loss.sum(), features)[0]).all()


def _empty(shape: tuple[int, int, int, int]) -> Call:
    b, c, h, w = shape
    features = torch.randn(*shape, requires_grad=True)
    target = torch.zeros(b, h, w, dtype=torch.long)
    return Call((features, target), {"confidence": torch.ones(b, h, w), "target_features": torch.randn(*shape)})


def _zero_and_none_shaped(call: Call, out: torch.Tensor) -> None:
    features, target = call.args
    assert out.item() == 0.0
    assert pixel_affinity_loss(features, target, reduction="none").shape == target.shape


class TestPixelAffinityLossOp(OpTester):
    function = staticmethod(pixel_affinity_loss)
    reference = staticmethod(pixel_affinity_loss_dense)
    not_applicable = {"state_dict": "the loss has no parameters or buffers"}

    def bad_inputs(self) -> list[BadInput]:
        tensors = [
            ("target-size", "target", torch.zeros(2, 4, 4, dtype=torch.long), r"target must have shape \(B, H, W\) of features = \(2, 4, 5\), got \(2, 4, 4\)"),
            ("target-batch", "target", torch.zeros(1, 4, 5, dtype=torch.long), r"target must have shape .* = \(2, 4, 5\), got \(1, 4, 5\)"),
            ("target-rank", "target", torch.zeros(2, 1, 4, 5, dtype=torch.long), r"target must have shape .* got \(2, 1, 4, 5\)"),
            ("target-float", "target", torch.zeros(2, 4, 5), r"target must hold integer class labels, got dtype torch.float32"),
            ("target-negative", "target", torch.full((2, 4, 5), -1), r"target must hold class labels >= 0 or ignore_index=255, got 40 other"),
            ("confidence-size", "confidence", torch.rand(2, 5, 4), r"confidence must have shape \(B, H, W\) of features = \(2, 4, 5\), got \(2, 5, 4\)"),
            ("confidence-above-1", "confidence", torch.full((2, 4, 5), 1.5), r"confidence must lie in \[0.0, 1.0\], got 40 value\(s\) outside, e.g. 1.5"),
            ("confidence-below-0", "confidence", torch.full((2, 4, 5), -0.1), r"confidence must lie in \[0.0, 1.0\]"),
            ("confidence-nan", "confidence", torch.full((2, 4, 5), float("nan")), r"confidence must lie in \[0.0, 1.0\].*nan"),
            ("confidence-integer", "confidence", torch.ones(2, 4, 5, dtype=torch.long), r"confidence must be a floating-point tensor"),
            ("target_features-size", "target_features", torch.randn(2, 3, 4, 4), r"target_features must have shape \(B, C, H, W\) of features = \(2, 3, 4, 5\), got \(2, 3, 4, 4\)"),
            ("target_features-channels", "target_features", torch.randn(2, 4, 4, 5), r"target_features must have shape .* got \(2, 4, 4, 5\)"),
            ("features-rank", "features", torch.randn(2, 4, 5), r"features must be 4-D \(B, C, H, W\), got 3-D"),
            ("features-integer", "features", torch.ones(2, 3, 4, 5, dtype=torch.long), r"features must be a floating-point tensor"),
        ]
        cases = [BadInput(i, lambda n=name, t=bad: _module_with(n, t), ValueError, m) for i, name, bad, m in tensors]
        for name, kwargs, message in [
            ("reduction", {"reduction": "xyz"}, r"reduction must be one of 'none', 'mean', 'sum', got 'xyz'"),
            ("threshold", {"threshold": 1.5}, r"threshold must be in \[0.0, 1.0\], got 1.5"),
            ("eps", {"eps": 0.0}, r"eps must be in \(0.0, 0.5\], got 0.0"),
        ]:
            cases.append(BadInput(f"{name}-module", lambda k=kwargs: PixelAffinityLoss(**k), ValueError, message))  # type: ignore[arg-type]
            cases.append(BadInput(f"{name}-function", lambda k=kwargs: pixel_affinity_loss(_good()["features"], _good()["target"], **k),  # type: ignore[arg-type]
                                  ValueError, message))
        cases += [
            BadInput("ignore_index-float", lambda: PixelAffinityLoss(ignore_index=255.0), TypeError, r"ignore_index must be an int, got float"),  # type: ignore[arg-type]
            BadInput("target-list", lambda: PixelAffinityLoss()(torch.randn(1, 2, 2, 2), [[0, 1], [1, 0]]), TypeError,  # type: ignore[arg-type]
                     r"target must be a torch.Tensor, got list"),
        ]
        return cases

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"gt-and-pseudo-forms": pal_calls()}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        features, target = call.args
        assert out.shape == (target.shape if call.kwargs["reduction"] == "none" else ())
        assert out.dtype == features.dtype
        # KL >= 0 up to rounding: where q_G = q_Ĝ its two log-differences cancel, and hypothesis
        # found -2.2e-17 in float64 (under an ulp of 1; the layer does not clamp the KL at 0)
        assert out.min() >= -8 * torch.finfo(out.dtype).eps

    def reference_cases(self) -> list[Case]:
        forms = {"gt": False, "pseudo": True}
        cases = [
            Case(f"{form}-{reduction}",
                 lambda dtype, p=pseudo, r=reduction: _loss_call(_case(3, 16, 9, 11, pseudo=p, dtype=dtype), reduction=r, threshold=0.4))
            for form, pseudo in forms.items()
            for reduction in REDUCTIONS
        ]
        # lines and odd batches (degenerate shapes), in value and gradient
        cases += [
            Case(name, lambda dtype, s=shape: _loss_call(_case(*s, pseudo=True, dtype=dtype), threshold=0.2))
            for name, shape in [("line-1x7", (3, 4, 1, 7)), ("line-7x1", (1, 4, 7, 1)), ("odd-batch-5", (5, 2, 2, 2))]
        ]
        return cases

    def gradcheck_cases(self) -> list[Case]:
        return [
            Case(form, lambda p=pseudo: _loss_call(_case(2, 3, 4, 5, pseudo=p), threshold=0.3))
            for form, pseudo in {"gt": False, "pseudo": True}.items()
        ]

    def module_cases(self) -> list[ModuleCase]:
        def build(pseudo: bool, **options: object) -> tuple[nn.Module, Call]:
            features, target, confidence, target_features = _case(2, 5, 6, 7, pseudo=pseudo)
            kwargs = {"confidence": confidence, "target_features": target_features} if pseudo else {}
            return PixelAffinityLoss(**options), Call((features, target), kwargs)  # type: ignore[arg-type]

        return [
            ModuleCase("pseudo-every-option", lambda: build(True, threshold=0.5, ignore_index=2, reduction="sum", eps=1e-5)),
            ModuleCase("gt-defaults", lambda: build(False)),
            ModuleCase("gt-none", lambda: build(False, reduction="none")),
        ]

    def module_as_function(self, module: nn.Module) -> object:
        assert isinstance(module, PixelAffinityLoss)
        return lambda features, target, *, confidence=None, target_features=None: pixel_affinity_loss(
            features, target, confidence=confidence, target_features=target_features, threshold=module.threshold,
            ignore_index=module.ignore_index, reduction=module.reduction, eps=module.eps,
        )

    def repr_cases(self) -> list[ReprCase]:
        return [ReprCase("every-option", lambda: PixelAffinityLoss(threshold=0.5, ignore_index=-1, reduction="sum", eps=1e-5),
                         ("threshold=0.5", "ignore_index=-1", "reduction='sum'", "eps=1e-05"))]

    def compile_cases(self) -> list[RunCase]:
        def build() -> tuple[object, Call]:
            layer = PixelAffinityLoss(threshold=0.3)

            def both_forms(x: torch.Tensor, target: torch.Tensor, confidence: torch.Tensor, target_x: torch.Tensor) -> torch.Tensor:
                return layer(x, target) + layer(x, target, confidence=confidence, target_features=target_x)

            features, target, confidence, target_features = _case(2, 6, 5, 7, pseudo=True, dtype=torch.float32)
            return both_forms, Call((features.requires_grad_(), target, confidence, target_features))

        return [RunCase("gt-plus-pseudo", build)]

    def device_cases(self) -> list[RunCase]:
        return [
            RunCase(form, lambda p=pseudo: (pixel_affinity_loss, _loss_call(_case(3, 32, 17, 13, pseudo=p, dtype=torch.float32), threshold=0.3)),
                    tol={"atol": 1e-5, "rtol": 1e-4})
            for form, pseudo in {"gt": False, "pseudo": True}.items()
        ]

    def degenerate_cases(self) -> list[Case]:
        def partly_zero_and_huge() -> Call:
            features = 1e15 * torch.randn(2, 4, 6, 6)
            features[:, :, :3] = 0
            target = (torch.rand(2, 6, 6) > 0.5).long()
            return Call((features.requires_grad_(), target), {"target_features": features.detach() * 1e-20})

        def zero_features(pseudo: bool) -> Call:
            target = (torch.rand(2, 5, 5) > 0.5).long()
            return Call((torch.zeros(2, 4, 5, 5, requires_grad=True), target),
                        {"target_features": torch.zeros(2, 4, 5, 5) if pseudo else None})

        forms = {"gt": False, "pseudo": True}
        return [
            *(
                Case(f"no-valid-pixel-{how}-{form}", lambda h=how, p=pseudo: _no_valid_pixel(h, p), shape=(),
                     check=_exact_zero_with_zero_gradient)
                for how in ("ignored", "unconfident", "one_pixel", "isolated")
                for form, pseudo in forms.items()
            ),
            *(Case(f"zero-features-{form}", lambda p=pseudo: zero_features(p), check=_finite_in_every_reduction)
              for form, pseudo in forms.items()),
            Case("partly-zero-and-huge-features", partly_zero_and_huge),
            *(Case(f"empty-{'x'.join(map(str, shape))}", lambda s=shape: _empty(s), shape=(), check=_zero_and_none_shaped)
              for shape in [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0), (2, 0, 3, 3)]),
        ]


@st.composite
def affinity_calls(draw: st.DrawFn) -> Call:
    b, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 10)), draw(st.integers(1, 10))
    features = torch.randn(b, c, h, w, dtype=torch.float64)
    return Call((features, torch.rand(b, h, w) > 0.2))


def _affinity_call(shape: tuple[int, int, int, int], dtype: torch.dtype, *, valid: float = 0.2) -> Call:
    b, _, h, w = shape
    return Call((torch.randn(*shape, dtype=dtype, requires_grad=True), torch.rand(b, h, w) > valid))


def _no_cosine_and_no_weight(call: Call, out: object) -> None:
    # all-zero features: every cosine and weight is 0 (eps), not NaN
    assert not out.cosine.any() and not out.weights.any()  # type: ignore[attr-defined]


class TestPixelAffinityOp(OpTester):
    function = staticmethod(pixel_affinity)
    reference = staticmethod(pixel_affinity_dense)
    not_applicable = {
        "module": "a function only (PixelAffinityLoss is the loss's module)",
        "repr": "a function only",
        "state_dict": "a function only",
        "compile": "the loss's compile case runs the same code (pixel_affinity_loss calls it)",
    }

    def bad_inputs(self) -> list[BadInput]:
        features = torch.randn(1, 2, 3, 3)
        return [
            BadInput("valid-integer", lambda: pixel_affinity(features, torch.ones(1, 3, 3, dtype=torch.long)), ValueError,
                     r"valid must be a bool tensor, got dtype torch.int64"),
            BadInput("valid-size", lambda: pixel_affinity(features, torch.ones(1, 3, 4, dtype=torch.bool)), ValueError,
                     r"valid must have shape \(B, H, W\) = \(1, 3, 3\), got \(1, 3, 4\)"),
            BadInput("features-rank", lambda: pixel_affinity(torch.randn(2, 3, 3)), ValueError,
                     r"features must be 4-D \(B, C, H, W\), got 3-D"),
            BadInput("eps", lambda: pixel_affinity(features, eps=0.6), ValueError, r"eps must be in \(0.0, 0.5\], got 0.6"),
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"valid-maps": affinity_calls()}

    def check_output(self, call: Call, out: object) -> None:
        features, _ = call.args
        b, _, h, w = features.shape
        for field in out:  # type: ignore[attr-defined]
            assert field.shape == (b, 8, h, w)
        aff = out
        assert aff.valid.dtype == torch.bool  # type: ignore[attr-defined]
        assert not aff.weights[~aff.valid].any() and not aff.cosine[~aff.valid].any()  # type: ignore[attr-defined]
        # L1-normalised: |N1| sums to 1 wherever a valid neighbour exists (random features: s != 0)
        has_neighbour = aff.valid.any(1)  # type: ignore[attr-defined]
        torch.testing.assert_close(aff.weights.abs().sum(1)[has_neighbour],  # type: ignore[attr-defined]
                                   torch.ones(int(has_neighbour.sum()), dtype=torch.float64))

    def reference_cases(self) -> list[Case]:
        return [Case("random-valid-map", lambda dtype: _affinity_call((2, 5, 6, 7), dtype))]

    def gradcheck_cases(self) -> list[Case]:
        def valid_map(pseudo: bool) -> Call:
            features, target, _, _ = _case(2, 3, 4, 5, pseudo=pseudo)
            return Call((features.requires_grad_(), target != 255))

        return [Case(f"valid-map-{form}", lambda p=pseudo: valid_map(p)) for form, pseudo in {"gt": False, "pseudo": True}.items()]

    def device_cases(self) -> list[RunCase]:
        return [RunCase("float32", lambda: (pixel_affinity, _affinity_call((3, 32, 17, 13), torch.float32)),
                        tol={"atol": 1e-5, "rtol": 1e-4})]

    def degenerate_cases(self) -> list[Case]:
        def nothing_valid(call: Call, out: object) -> None:
            for field in out:  # type: ignore[attr-defined]
                assert not field.any()

        def one(shape: tuple[int, int, int, int], *, zeros: bool = False, valid: bool = True) -> Call:
            b, _, h, w = shape
            features = torch.zeros(*shape) if zeros else torch.randn(*shape)
            return Call((features.requires_grad_(), torch.full((b, h, w), valid)))

        return [
            Case("1x1", lambda: one((2, 3, 1, 1)), shape=(2, 8, 1, 1), check=nothing_valid),
            Case("all-invalid", lambda: one((2, 3, 4, 4), valid=False), shape=(2, 8, 4, 4), reference=True, check=nothing_valid),
            Case("empty-batch", lambda: one((0, 3, 4, 4)), shape=(0, 8, 4, 4), reference=True),
            Case("zero-features", lambda: one((2, 3, 4, 4), zeros=True), shape=(2, 8, 4, 4), reference=True, check=_no_cosine_and_no_weight),
        ]



# --- PixelAffinityLoss: hand-computed values and rules -----------------------------------------


def test_smoke() -> None:
    features = torch.randn(2, 16, 9, 9, requires_grad=True)
    target = (torch.rand(2, 9, 9) > 0.5).long()
    loss = PixelAffinityLoss()(features, target)
    loss.backward()
    assert loss.shape == () and loss.dtype == torch.float32 and loss > 0
    assert features.grad is not None and torch.isfinite(features.grad).all()


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


def test_negative_ignore_index_is_ignored() -> None:
    features, target, _, _ = _case(1, 3, 5, 5, pseudo=False)
    moved = torch.where(target == 255, -100, target)
    torch.testing.assert_close(
        pixel_affinity_loss(features, moved, ignore_index=-100), pixel_affinity_loss(features, target)
    )


# --- gradients: chunking, the detached target side -------------------------------------------------


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


# --- precision -------------------------------------------------------------------------------------


def test_bfloat16_features_give_a_float32_loss_close_to_float64() -> None:
    case = _case(2, 8, 6, 6, pseudo=True)
    low = tuple(t.bfloat16() if t is not None and t.is_floating_point() else t for t in case)
    features = low[0].requires_grad_()  # type: ignore[union-attr]
    out = _fast(low)  # type: ignore[arg-type]
    out.backward()
    assert out.dtype == torch.float32 and features.grad is not None and features.grad.dtype == torch.bfloat16
    reference = _dense(tuple(t.double() if t is not None and t.is_floating_point() else t for t in low))  # type: ignore[arg-type]
    _close(out.double(), reference, torch.bfloat16)


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
