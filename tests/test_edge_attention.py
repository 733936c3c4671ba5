"""EdgePrototypeAttention: the style-rule-12 checklist, against the dense Eqs. 9-10."""

from __future__ import annotations

import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cscpa_layers import (
    AdaptiveEdgeContainer,
    EdgePrototypeAttention,
    ForegroundPrototypeAttention,
    edge_prototype_attention,
)
from cscpa_layers._reference.edge_attention import edge_prototype_attention_dense
from tests.conftest import DEVICES, TOLERANCES, compile_available


def _ready(channels: int = 8, slots: int = 4, dtype: torch.dtype = torch.float32, **kwargs: object) -> EdgePrototypeAttention:
    epa = EdgePrototypeAttention(channels, slots=slots, **kwargs).to(dtype)  # type: ignore[arg-type]
    epa.container.initialize(torch.randn(2 * slots, channels, dtype=dtype), torch.Generator().manual_seed(0))
    return epa


@st.composite
def epa_cases(draw: st.DrawFn) -> tuple[int, int, int, int, torch.dtype, float, bool]:
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 16))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    temperature = draw(st.sampled_from([0.1, 0.5, 1.0, 4.0]))
    rescale = draw(st.booleans())
    return b, c, h, w, dtype, temperature, rescale


# --- smoke, shapes, reference -------------------------------------------------------------------


def test_smoke() -> None:
    epa = _ready()
    x = torch.randn(2, 8, 6, 5)
    out = epa(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


@given(epa_cases())
def test_shape_dtype_and_reference_property(case: tuple[int, int, int, int, torch.dtype, float, bool]) -> None:
    b, c, h, w, dtype, temperature, rescale = case
    x = torch.randn(b, c, h, w, dtype=dtype)
    prototype = torch.randn(c, dtype=dtype)
    out = edge_prototype_attention(x, prototype, temperature=temperature, rescale=rescale)
    assert out.shape == (b, c, h, w) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = edge_prototype_attention_dense(x.double(), prototype.double(), temperature=temperature, rescale=rescale)
    tol = dict(TOLERANCES[dtype])
    if dtype == torch.bfloat16:  # x + F_e can cancel: allow a few bf16 ulps of the largest entry
        tol["atol"] = max(tol["atol"], 0.05 * ref.abs().max().item())
    torch.testing.assert_close(out.double(), ref, **tol)


@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_dense_in_value_and_gradient(rescale: bool, dtype: torch.dtype) -> None:
    x = torch.randn(3, 6, 5, 7, dtype=dtype, requires_grad=True)
    prototype = torch.randn(6, dtype=dtype, requires_grad=True)
    upstream = torch.randn(3, 6, 5, 7, dtype=dtype)
    out = edge_prototype_attention(x, prototype, temperature=0.7, rescale=rescale)
    ref = edge_prototype_attention_dense(x, prototype, temperature=0.7, rescale=rescale)
    grads = torch.autograd.grad(out, [x, prototype], upstream)
    ref_grads = torch.autograd.grad(ref, [x, prototype], upstream)
    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


# --- hand-computed values -----------------------------------------------------------------------


def test_two_pixels_by_hand() -> None:
    # Pixel 0 is parallel to P_e (cos 1), pixel 1 orthogonal (cos 0): weights e : 1 over e + 1.
    x = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    prototype = torch.tensor([1.0, 0.0])
    e = math.e
    raw = torch.tensor([e / (e + 1), 1 / (e + 1)])
    for rescale, scale in ((False, 1.0), (True, 2.0)):
        out = edge_prototype_attention(x, prototype, rescale=rescale)
        f_e = scale * raw[None, :] * prototype[:, None]  # (C, N), the outer product
        torch.testing.assert_close(out[0, :, 0], x[0, :, 0] + f_e)


def test_temperature_sharpens() -> None:
    x = torch.tensor([[[[2.0, 0.0]], [[0.0, 3.0]]]])
    prototype = torch.tensor([1.0, 0.0])
    out = edge_prototype_attention(x, prototype, temperature=0.5, rescale=False)
    weight = math.exp(2) / (math.exp(2) + 1)  # cos / T = 2 and 0
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(2.0 + weight))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_magnitude_with_and_without_rescale(temperature: float) -> None:
    # |F_e[:, p]| = w_p |P_e|. With rescale the mean weight is 1, so the mean per-pixel norm of
    # F_e is |P_e|; without it the weights sum to 1 and the mean is |P_e| / N.
    x = torch.randn(2, 16, 9, 11, dtype=torch.float64)
    prototype = torch.randn(16, dtype=torch.float64)
    n = 9 * 11
    for rescale, mean_weight in ((True, 1.0), (False, 1.0 / n)):
        f_e = edge_prototype_attention(x, prototype, temperature=temperature, rescale=rescale) - x
        norms = f_e.norm(dim=1)  # (B, H, W)
        expected = prototype.norm() * mean_weight
        torch.testing.assert_close(norms.mean(dim=(1, 2)), expected.expand(2))
        # cos lies in [-1, 1], so every weight is within e^(+-2/T) of the mean weight
        bound = math.exp(2 / temperature)
        assert (norms <= expected * bound * (1 + 1e-9)).all() and (norms >= expected / bound * (1 - 1e-9)).all()


def test_pixels_like_the_prototype_get_most() -> None:
    prototype = torch.tensor([1.0, 0.0, 0.0])
    x = torch.randn(1, 3, 4, 4)
    x[0, :, 1, 2] = torch.tensor([5.0, 0.0, 0.0])  # the one pixel along P_e
    weights = (edge_prototype_attention(x, prototype) - x).norm(dim=1)[0]  # (H, W)
    assert weights.argmax().item() == 1 * 4 + 2


# --- gradients ----------------------------------------------------------------------------------


@pytest.mark.parametrize("rescale", [True, False])
def test_gradcheck(rescale: bool) -> None:
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    prototype = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, p: edge_prototype_attention(a, p, temperature=0.5, rescale=rescale), (x, prototype)
    )


def test_gradcheck_through_update_and_forward() -> None:
    # x, the mixer's weight and bias all get exact gradients through bank -> P_e -> EPA.
    epa = _ready(3, 4, torch.float64)
    start = epa.container.bank.clone()
    candidates = torch.randn(6, 3, dtype=torch.float64)
    x = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # weight and bias are the mixer's own parameters
            epa.container.bank.copy_(start)
        return epa(x, epa.container.update(candidates, torch.Generator().manual_seed(3)))

    assert torch.autograd.gradcheck(fn, (x, epa.container.mixer.weight, epa.container.mixer.bias))


def test_mixer_learns_from_a_loss_on_the_epa_output() -> None:
    epa = _ready()
    x = torch.randn(2, 8, 5, 5)
    bank = epa.container.update(torch.randn(12, 8))
    epa(x, bank).square().mean().backward()
    grad = epa.container.mixer.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert epa.container.mixer.bias.grad is not None and epa.container.mixer.bias.grad.abs().sum() > 0


def test_stored_bank_forward_gives_the_mixer_no_gradient() -> None:
    epa = _ready()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    epa(x).square().sum().backward()
    assert x.grad is not None
    assert epa.container.mixer.weight.grad is None  # the stored bank is a detached buffer


# --- initialisation gate, module, state -----------------------------------------------------------


def test_identity_until_initialized() -> None:
    epa = EdgePrototypeAttention(8, slots=4)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    out = epa(x)
    assert torch.equal(out, x)
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert torch.equal(grad, torch.ones_like(x))
    epa.container.initialize(torch.randn(4, 8))
    assert not torch.equal(epa(x), x)


def test_an_explicit_bank_is_used_even_before_initialization() -> None:
    epa = EdgePrototypeAttention(8, slots=4)
    x = torch.randn(2, 8, 5, 5)
    bank = torch.randn(4, 8)
    torch.testing.assert_close(epa(x, bank), edge_prototype_attention(x, bank.mean(0)))


def test_module_equals_function() -> None:
    epa = _ready(8, 4, temperature=0.3, rescale=False, eps=1e-5)
    x = torch.randn(3, 8, 4, 6)
    expected = edge_prototype_attention(x, epa.container.bank.mean(0), temperature=0.3, rescale=False, eps=1e-5)
    torch.testing.assert_close(epa(x), expected)
    bank = torch.randn(4, 8)
    torch.testing.assert_close(epa(x, bank), edge_prototype_attention(x, bank.mean(0), temperature=0.3, rescale=False, eps=1e-5))


def test_train_and_eval_agree() -> None:
    epa = _ready()
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(epa.train()(x), epa.eval()(x))


def test_state_dict_round_trip_keeps_the_bank() -> None:
    epa = _ready()
    epa.container.update(torch.randn(10, 8))
    buffer = io.BytesIO()
    torch.save(epa.state_dict(), buffer)
    buffer.seek(0)
    fresh = EdgePrototypeAttention(8, slots=4)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 8, 5, 5)
    assert bool(fresh.container.initialized)
    torch.testing.assert_close(fresh(x), epa(x))


def test_owns_a_container() -> None:
    epa = EdgePrototypeAttention(8, slots=5)
    assert isinstance(epa.container, AdaptiveEdgeContainer)
    assert (epa.container.channels, epa.container.slots) == (8, 5)
    assert {name for name, _ in epa.named_parameters()} == {"container.mixer.weight", "container.mixer.bias"}


def test_extra_repr_shows_every_hyper_parameter() -> None:
    text = repr(EdgePrototypeAttention(8, slots=5, temperature=0.5, rescale=False, eps=1e-5))
    for part in ("channels=8", "slots=5", "temperature=0.5", "rescale=False", "eps=1e-05"):
        assert part in text


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_compiled_equals_eager() -> None:
    epa = EdgePrototypeAttention(8, slots=4)
    compiled = torch.compile(epa, fullgraph=True)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    assert torch.equal(compiled(x), x)  # not initialised: identity, from torch.where on the flag
    epa.container.initialize(torch.randn(6, 8))
    bank = epa.container.update(torch.randn(6, 8))
    for args in ((x,), (x, bank)):
        eager_out = epa(*args)
        eager_grads = torch.autograd.grad(
            eager_out.square().sum(), [x, *epa.parameters()], allow_unused=True, retain_graph=True
        )  # keeps the update's graph for the compiled pass
        out = compiled(*args)
        grads = torch.autograd.grad(out.square().sum(), [x, *epa.parameters()], allow_unused=True)
        torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
        for got, want in zip(grads, eager_grads):
            assert (got is None) == (want is None)
            if got is not None and want is not None:
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        bank = epa.container.update(torch.randn(6, 8))  # a fresh graph for the second round


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_equals_cpu(dtype: torch.dtype) -> None:
    epa = _ready(16, 8)
    x = torch.randn(2, 16, 9, 9)
    want = epa(x)
    got = epa.to("cuda", dtype)(x.to("cuda", dtype))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 0.3, "rtol": 5e-2}
    torch.testing.assert_close(got.float().cpu(), want, **tol)


# --- residual=False: the term F_e alone, for x + F_f + F_e -----------------------------------


@pytest.mark.parametrize("rescale", [True, False])
def test_residual_false_returns_the_term_alone(rescale: bool) -> None:
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    prototype = torch.randn(6, dtype=torch.float64)
    term = edge_prototype_attention(x, prototype, temperature=0.7, rescale=rescale, residual=False)
    ref = edge_prototype_attention_dense(x, prototype, temperature=0.7, rescale=rescale) - x
    torch.testing.assert_close(term, ref, **TOLERANCES[torch.float64])
    full = edge_prototype_attention(x, prototype, temperature=0.7, rescale=rescale)
    torch.testing.assert_close(x + term, full, **TOLERANCES[torch.float64])
    assert torch.autograd.gradcheck(
        lambda a, p: edge_prototype_attention(a, p, rescale=rescale, residual=False),
        (x[:1, :, :2, :3].clone().requires_grad_(), prototype.clone().requires_grad_()),
    )


def test_module_residual_false_before_and_after_initialization() -> None:
    epa = EdgePrototypeAttention(8, slots=4, gate=True)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(epa(x, residual=False), torch.zeros_like(x))  # not initialised: no term
    epa.container.initialize(torch.randn(6, 8))
    with torch.no_grad():
        epa.gate.fill_(0.4)  # type: ignore[union-attr]
    term = epa(x, residual=False)  # gamma * F_e
    torch.testing.assert_close(x + term, epa(x))
    f_e = edge_prototype_attention(x, epa.container.prototype(), residual=False)
    torch.testing.assert_close(term, 0.4 * f_e)
    bank = torch.randn(4, 8)
    torch.testing.assert_close(epa(x, bank, residual=False), 0.4 * edge_prototype_attention(x, bank.mean(0), residual=False))
    with pytest.raises(TypeError, match=r"residual must be a bool, got int"):
        epa(x, residual=1)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"residual must be a bool, got NoneType"):
        edge_prototype_attention(x, bank.mean(0), residual=None)  # type: ignore[arg-type]


def test_fusion_with_residual_false_equals_the_re_typed_sum() -> None:
    # F' = F + F_f + F_e, written without re-adding and subtracting F
    fpa = ForegroundPrototypeAttention(8).double()
    epa = _ready(8, 4, torch.float64)
    x = torch.randn(4, 8, 5, 6, dtype=torch.float64)
    fused = x + fpa(x, residual=False) + epa(x, residual=False)
    torch.testing.assert_close(fused, fpa(x) + epa(x) - x, **TOLERANCES[torch.float64])
    assert not torch.allclose(fused, x)


# --- degenerate input ---------------------------------------------------------------------------


def test_all_zero_features_and_prototype_stay_finite() -> None:
    x = torch.zeros(2, 4, 3, 3, requires_grad=True)
    prototype = torch.zeros(4, requires_grad=True)
    out = edge_prototype_attention(x, prototype)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all() and torch.isfinite(prototype.grad).all()
    # zero features, nonzero prototype: all cosines 0, uniform weights, F_e = P_e everywhere
    p = torch.tensor([1.0, -2.0, 0.5, 3.0])
    out = edge_prototype_attention(torch.zeros(1, 4, 2, 2), p)
    torch.testing.assert_close(out, p.view(1, 4, 1, 1).expand(1, 4, 2, 2))


def test_one_by_one_map_adds_the_prototype() -> None:
    x = torch.randn(3, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    prototype = torch.randn(4, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(edge_prototype_attention(x, prototype), x + prototype.view(1, 4, 1, 1))
    assert torch.autograd.gradcheck(lambda a, p: edge_prototype_attention(a, p), (x, prototype))


def test_empty_batch_gives_empty_output() -> None:
    epa = _ready(4, 2)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    out = epa(x)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_large_magnitudes_stay_finite() -> None:
    x = (1e4 * torch.randn(2, 8, 5, 5)).requires_grad_()
    out = edge_prototype_attention(x, 1e4 * torch.randn(8), temperature=0.05)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


def test_autocast_bfloat16_runs_and_backpropagates() -> None:
    epa = _ready()
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    bank = epa.container.update(torch.randn(10, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = epa(x, bank)
    out.float().sum().backward()
    assert x.grad is not None and epa.container.mixer.weight.grad is not None
    ref = edge_prototype_attention_dense(x.detach().double(), bank.detach().double().mean(0))
    torch.testing.assert_close(out.double(), ref, atol=0.3, rtol=5e-2)


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 2, 2), (2, 8, 2, 2, 1), (8,)])
def test_wrong_rank_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, C, H, W\), got \d-D"):
        EdgePrototypeAttention(8)(torch.randn(*shape))


def test_wrong_channel_count_raises() -> None:
    with pytest.raises(ValueError, match=r"x must have 8 channels .* got 3"):
        EdgePrototypeAttention(8)(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize(
    ("prototype", "error", "message"),
    [
        (torch.randn(5), ValueError, r"prototype must have shape \(C,\) with C of x = \(4,\), got \(5,\)"),
        (torch.randn(1, 4), ValueError, r"prototype must have shape \(C,\) with C of x = \(4,\), got \(1, 4\)"),
        (torch.ones(4, dtype=torch.long), ValueError, r"prototype must be a floating-point tensor"),
        (torch.empty(4, device="meta"), ValueError, r"prototype must be on the same device as x \(cpu\), got meta"),
        ([0.0] * 4, TypeError, r"prototype must be a torch.Tensor, got list"),
    ],
)
def test_bad_prototype_raises(prototype: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        edge_prototype_attention(torch.randn(2, 4, 3, 3), prototype)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"temperature": 0.0}, ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
        ({"temperature": -1.0}, ValueError, r"temperature must be in \(0.0, inf\], got -1.0"),
        ({"eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
        ({"temperature": "1"}, TypeError, r"temperature must be a number, got str"),
        ({"rescale": 1}, TypeError, r"rescale must be a bool, got int"),
        ({"slots": 0}, ValueError, r"slots must be a positive int, got 0"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        EdgePrototypeAttention(4, **kwargs)  # type: ignore[arg-type]
    if "slots" not in kwargs:
        with pytest.raises(error, match=message):
            edge_prototype_attention(torch.randn(1, 4, 2, 2), torch.randn(4), **kwargs)  # type: ignore[arg-type]


def test_bad_input_types_raise() -> None:
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        EdgePrototypeAttention(4)([[1.0]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        EdgePrototypeAttention(4)(torch.ones(2, 4, 2, 2, dtype=torch.long))


def test_bank_of_the_wrong_shape_raises() -> None:
    with pytest.raises(ValueError, match=r"bank must have shape \(slots, C\) = \(3, 4\), got \(3, 5\)"):
        EdgePrototypeAttention(4, slots=3)(torch.randn(1, 4, 2, 2), torch.randn(3, 5))


# --- the gate (a deviation: gamma * F_e, gamma learnable from 0) ------------------------------------


def test_gate_starts_closed_and_opens_by_gradient() -> None:
    epa = _ready(gate=True)
    assert epa.gate is not None and epa.gate.item() == 0.0
    x = torch.randn(2, 8, 5, 6)
    bank = epa.container.update(torch.randn(6, 8))
    out = epa(x, bank)
    assert torch.equal(out, x)  # closed: switching EPA on changes nothing at once
    target = x + 0.3 * (edge_prototype_attention(x, bank.detach().mean(0)) - x)  # wants gamma = 0.3
    (out - target).square().sum().backward()
    assert epa.gate.grad is not None and epa.gate.grad.item() < 0  # gradient descent opens it
    # the gate scales the paper's term exactly: gamma = 0.3 gives F + 0.3 F_e
    with torch.no_grad():
        epa.gate.fill_(0.3)
    paper = EdgePrototypeAttention(8, slots=4)
    paper.container.load_state_dict(epa.container.state_dict())
    torch.testing.assert_close(epa(x) - x, 0.3 * (paper(x) - x), rtol=1e-5, atol=1e-6)


def test_gain_equals_the_dense_reference_scaled_in_value_and_gradient() -> None:
    x = torch.randn(2, 5, 4, 3, dtype=torch.float64, requires_grad=True)
    prototype = torch.randn(5, dtype=torch.float64, requires_grad=True)
    gain = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    ref = x + gain * (edge_prototype_attention_dense(x, prototype, temperature=0.5) - x)
    out = edge_prototype_attention(x, prototype, temperature=0.5, gain=gain)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    seed = torch.randn_like(out)
    want = torch.autograd.grad(ref, [x, prototype, gain], seed)
    got = torch.autograd.grad(out, [x, prototype, gain], seed)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda a, p, g: edge_prototype_attention(a, p, temperature=0.5, gain=g), (x, prototype, gain)
    )


def test_bad_gain_and_gate_raise() -> None:
    with pytest.raises(ValueError, match=r"gain must have shape \(\) \(a 0-d tensor\)"):
        edge_prototype_attention(torch.randn(1, 4, 2, 2), torch.randn(4), gain=torch.ones(1))
    with pytest.raises(TypeError, match="gain must be a float or a 0-d tensor, got str"):
        edge_prototype_attention(torch.randn(1, 4, 2, 2), torch.randn(4), gain="1")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="gate must be a bool, got int"):
        EdgePrototypeAttention(4, gate=1)  # type: ignore[arg-type]
    assert "gate=True" in repr(EdgePrototypeAttention(4, gate=True))


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_compiled_gate_equals_eager() -> None:
    epa = _ready(gate=True)
    with torch.no_grad():
        epa.gate.fill_(0.4)  # type: ignore[union-attr]
    compiled = torch.compile(epa, fullgraph=True)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    eager = epa(x)
    (gx_eager, gg_eager) = torch.autograd.grad(eager.square().sum(), [x, epa.gate])
    out = compiled(x)
    (gx, gg) = torch.autograd.grad(out.square().sum(), [x, epa.gate])
    torch.testing.assert_close(out, eager, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_eager, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(gg, gg_eager, atol=1e-3, rtol=1e-5)
