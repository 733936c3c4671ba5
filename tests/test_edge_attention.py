"""EdgePrototypeAttention: the shared checklist (tests/op_tester.py) and EPA's own tests."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import strategies as st
from torch import nn

from cscpa_layers import (
    AdaptiveEdgeContainer,
    EdgePrototypeAttention,
    ForegroundPrototypeAttention,
    edge_prototype_attention,
)
from cscpa_layers._reference.edge_attention import edge_prototype_attention_dense
from tests.conftest import TOLERANCES, compile_available
from tests.op_tester import BadInput, Call, Case, ModuleCase, OpTester, ReprCase, RunCase, StateCase

TOL64 = TOLERANCES[torch.float64]


def _ready(channels: int = 8, slots: int = 4, dtype: torch.dtype = torch.float32, **kwargs: object) -> EdgePrototypeAttention:
    epa = EdgePrototypeAttention(channels, slots=slots, **kwargs).to(dtype)  # type: ignore[arg-type]
    epa.container.initialize(torch.randn(2 * slots, channels, dtype=dtype), torch.Generator().manual_seed(0))
    return epa


@st.composite
def epa_calls(draw: st.DrawFn) -> Call:
    b = draw(st.integers(1, 3))
    c = draw(st.integers(1, 16))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    temperature = draw(st.sampled_from([0.1, 0.5, 1.0, 4.0]))
    rescale = draw(st.booleans())
    x, prototype = torch.randn(b, c, h, w, dtype=dtype), torch.randn(c, dtype=dtype)
    return Call((x, prototype), {"temperature": temperature, "rescale": rescale})


def _call(shape: tuple[int, ...], dtype: torch.dtype, *, scale: float = 1.0, zeros: bool = False, **kwargs: object) -> Call:
    """x of ``shape`` and a prototype, both requiring grad (unless ``zeros``: all-zero inputs)."""
    make = torch.zeros if zeros else torch.randn
    x = scale * make(*shape, dtype=dtype)
    prototype = scale * make(shape[1], dtype=dtype)
    return Call((x.requires_grad_(), prototype.requires_grad_()), kwargs)


class TestEdgePrototypeAttentionOp(OpTester):
    function = staticmethod(edge_prototype_attention)
    reference = staticmethod(edge_prototype_attention_dense)

    def bad_inputs(self) -> list[BadInput]:
        epa, x4 = EdgePrototypeAttention, torch.randn(2, 4, 3, 3)
        cases = [
            *(
                BadInput(f"rank-{len(shape)}", lambda shape=shape: epa(8)(torch.randn(*shape)), ValueError,
                         r"x must be 4-D \(B, C, H, W\), got \d-D")
                for shape in [(8, 2, 2), (2, 8, 2, 2, 1), (8,)]
            ),
            BadInput("channels", lambda: epa(8)(torch.randn(2, 3, 2, 2)), ValueError, r"x must have 8 channels .* got 3"),
            BadInput("x-type", lambda: epa(4)([[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),  # type: ignore[arg-type]
            BadInput("x-integer", lambda: epa(4)(torch.ones(2, 4, 2, 2, dtype=torch.long)), ValueError,
                     r"x must be a floating-point tensor, got dtype torch.int64"),
            BadInput("bank-shape", lambda: epa(4, slots=3)(torch.randn(1, 4, 2, 2), torch.randn(3, 5)), ValueError,
                     r"bank must have shape \(slots, C\) = \(3, 4\), got \(3, 5\)"),
            BadInput("gain-shape", lambda: edge_prototype_attention(x4, torch.randn(4), gain=torch.ones(1)), ValueError,
                     r"gain must have shape \(\) \(a 0-d tensor\)"),
            BadInput("gain-type", lambda: edge_prototype_attention(x4, torch.randn(4), gain="1"), TypeError,  # type: ignore[arg-type]
                     "gain must be a float or a 0-d tensor, got str"),
            BadInput("gate-type", lambda: epa(4, gate=1), TypeError, "gate must be a bool, got int"),  # type: ignore[arg-type]
            BadInput("residual-module", lambda: _ready()(torch.randn(2, 8, 5, 5), residual=1), TypeError,  # type: ignore[arg-type]
                     r"residual must be a bool, got int"),
            BadInput("residual-function", lambda: edge_prototype_attention(x4, torch.randn(4), residual=None), TypeError,  # type: ignore[arg-type]
                     r"residual must be a bool, got NoneType"),
        ]
        for name, prototype, error, message in [
            ("size", torch.randn(5), ValueError, r"prototype must have shape \(C,\) with C of x = \(4,\), got \(5,\)"),
            ("rank", torch.randn(1, 4), ValueError, r"prototype must have shape \(C,\) with C of x = \(4,\), got \(1, 4\)"),
            ("integer", torch.ones(4, dtype=torch.long), ValueError, r"prototype must be a floating-point tensor"),
            ("device", torch.empty(4, device="meta"), ValueError, r"prototype must be on the same device as x \(cpu\), got meta"),
            ("type", [0.0] * 4, TypeError, r"prototype must be a torch.Tensor, got list"),
        ]:
            cases.append(BadInput(f"prototype-{name}", lambda p=prototype: edge_prototype_attention(x4, p), error, message))  # type: ignore[arg-type]
        for name, kwargs, error, message in [
            ("temperature-0", {"temperature": 0.0}, ValueError, r"temperature must be in \(0.0, inf\], got 0.0"),
            ("temperature-negative", {"temperature": -1.0}, ValueError, r"temperature must be in \(0.0, inf\], got -1.0"),
            ("eps-0", {"eps": 0.0}, ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
            ("temperature-type", {"temperature": "1"}, TypeError, r"temperature must be a number, got str"),
            ("rescale-type", {"rescale": 1}, TypeError, r"rescale must be a bool, got int"),
        ]:
            cases.append(BadInput(f"{name}-module", lambda k=kwargs: epa(4, **k), error, message))  # type: ignore[arg-type]
            cases.append(BadInput(f"{name}-function", lambda k=kwargs: edge_prototype_attention(
                torch.randn(1, 4, 2, 2), torch.randn(4), **k), error, message))  # type: ignore[arg-type]
        cases.append(BadInput("slots-module", lambda: epa(4, slots=0), ValueError, r"slots must be a positive int, got 0"))
        return cases

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"default": epa_calls()}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        x = call.args[0]
        assert out.shape == x.shape and out.dtype == x.dtype

    def property_tolerance(self, call: Call, reference: object) -> dict[str, float]:
        tol = dict(TOLERANCES[call.dtype])  # type: ignore[index]
        if call.dtype == torch.bfloat16 and isinstance(reference, torch.Tensor):
            # x + F_e can cancel: allow a few bf16 ulps of the largest entry
            tol["atol"] = max(tol["atol"], 0.05 * reference.abs().max().item())
        return tol

    def reference_cases(self) -> list[Case]:
        cases = [
            Case(f"rescale-{rescale}", lambda dtype, r=rescale: _call((3, 6, 5, 7), dtype, temperature=0.7, rescale=r))
            for rescale in (True, False)
        ]
        cases += [
            Case(f"residual-false-rescale-{rescale}",
                 lambda dtype, r=rescale: _call((3, 6, 5, 7), dtype, temperature=0.7, rescale=r, residual=False))
            for rescale in (True, False)
        ]
        # a learnable gain g (EPA's gate) scales F_e exactly: x + g F_e, gradient into g too
        cases.append(Case("gain", lambda dtype: _gained(dtype), dtypes=(torch.float64,), tol={"rtol": 1e-10, "atol": 1e-12}))
        return cases

    def gradcheck_cases(self) -> list[Case]:
        return [
            *(Case(f"rescale-{r}", lambda r=r: _call((2, 4, 3, 3), torch.float64, temperature=0.5, rescale=r)) for r in (True, False)),
            *(Case(f"residual-false-rescale-{r}", lambda r=r: _call((1, 6, 2, 3), torch.float64, rescale=r, residual=False))
              for r in (True, False)),
            Case("gain", lambda: _gained(torch.float64, (2, 5, 4, 3))),
        ]

    def module_cases(self) -> list[ModuleCase]:
        def stored(**kwargs: object) -> tuple[nn.Module, Call]:
            residual = kwargs.pop("residual", True)
            shape = kwargs.pop("shape", (3, 8, 4, 6))
            epa = _ready(8, 4, temperature=0.3, rescale=False, eps=1e-5, **kwargs)
            if epa.gate is not None:
                with torch.no_grad():
                    epa.gate.fill_(0.4)
            return epa, Call((torch.randn(*shape),), {"residual": residual})

        def explicit(residual: bool = True) -> tuple[nn.Module, Call]:
            epa, call = stored()
            return epa, Call((call.args[0], torch.randn(4, 8)), {"residual": residual})

        return [
            ModuleCase("stored-bank", stored),
            ModuleCase("explicit-bank", explicit),
            ModuleCase("gate", lambda: stored(gate=True)),
            ModuleCase("residual-false", lambda: stored(residual=False)),
            ModuleCase("residual-false-explicit-bank", lambda: explicit(False)),
            ModuleCase("empty-batch", lambda: stored(shape=(0, 8, 3, 3))),
        ]

    def module_as_function(self, module: nn.Module) -> object:
        assert isinstance(module, EdgePrototypeAttention) and bool(module.container.initialized)

        def function(x: torch.Tensor, bank: torch.Tensor | None = None, *, residual: bool = True) -> torch.Tensor:
            prototype = (module.container.bank if bank is None else bank).mean(0)  # Eq. 8
            gain = 1.0 if module.gate is None else module.gate
            return edge_prototype_attention(
                x, prototype, temperature=module.temperature, rescale=module.rescale, gain=gain, eps=module.eps,
                residual=residual,
            )

        return function

    def repr_cases(self) -> list[ReprCase]:
        return [
            ReprCase("every-option", lambda: EdgePrototypeAttention(8, slots=5, temperature=0.5, rescale=False, eps=1e-5),
                     ("channels=8", "slots=5", "temperature=0.5", "rescale=False", "eps=1e-05", "gate=False")),
            ReprCase("gate", lambda: EdgePrototypeAttention(4, gate=True), ("gate=True",)),
        ]

    def state_cases(self) -> list[StateCase]:
        def build() -> tuple[nn.Module, nn.Module, object]:
            epa = _ready()
            epa.container.update(torch.randn(10, 8))
            x = torch.randn(2, 8, 5, 5)
            return epa, EdgePrototypeAttention(8, slots=4), lambda m: (m.container.initialized, m(x))

        return [StateCase("initialized-and-updated", build)]  # type: ignore[arg-type]

    def compile_cases(self) -> list[RunCase]:
        def gate() -> tuple[nn.Module, Call]:
            epa = _ready(gate=True)
            with torch.no_grad():
                epa.gate.fill_(0.4)  # type: ignore[union-attr]
            return epa, Call((torch.randn(2, 8, 5, 6, requires_grad=True),))

        def term_only() -> tuple[nn.Module, Call]:
            return _TermOnly(_ready()), Call((torch.randn(2, 8, 5, 6, requires_grad=True),))

        # gradients in order: x, the gate, the mixer's weight and bias (unused: the stored bank)
        gate_tol = [{"atol": 1e-4, "rtol": 1e-5}, {"atol": 1e-3, "rtol": 1e-5}, {"atol": 0.0, "rtol": 0.0}, {"atol": 0.0, "rtol": 0.0}]
        return [RunCase("gate", gate, grad_tol=gate_tol), RunCase("residual-false", term_only)]

    def device_cases(self) -> list[RunCase]:
        def build() -> tuple[nn.Module, Call]:
            return _ready(16, 8), Call((torch.randn(2, 16, 9, 9),))

        return [
            RunCase("float32", build, dtype=torch.float32, tol={"atol": 1e-4, "rtol": 1e-4}),
            RunCase("bfloat16", build, dtype=torch.bfloat16, tol={"atol": 0.3, "rtol": 5e-2}),
        ]

    def degenerate_cases(self) -> list[Case]:
        def uniform(call: Call, out: torch.Tensor) -> None:
            # zero features, nonzero prototype: all cosines 0, uniform weights, F_e = P_e everywhere
            prototype = call.args[1]
            torch.testing.assert_close(out, prototype.view(1, -1, 1, 1).expand_as(out), rtol=1.3e-6, atol=1e-5)

        def adds_the_prototype(call: Call, out: torch.Tensor) -> None:
            x, prototype = call.args
            torch.testing.assert_close(out, x + prototype.view(1, -1, 1, 1), rtol=1e-7, atol=1e-7)

        def zero_features() -> Call:
            return Call((torch.zeros(1, 4, 2, 2), torch.tensor([1.0, -2.0, 0.5, 3.0])))

        return [
            Case("all-zero-features-and-prototype", lambda: _call((2, 4, 3, 3), torch.float32, zeros=True)),
            Case("zero-features", zero_features, check=uniform),
            Case("1x1", lambda: _call((3, 4, 1, 1), torch.float64), gradcheck=True, reference=True, check=adds_the_prototype),
            Case("empty-batch", lambda: _call((0, 4, 3, 3), torch.float32), shape=(0, 4, 3, 3)),
            Case("large-magnitudes", lambda: Call(((1e4 * torch.randn(2, 8, 5, 5)).requires_grad_(), 1e4 * torch.randn(8)),
                                                  {"temperature": 0.05})),
        ]


class _TermOnly(nn.Module):
    """EPA in a model that adds its term alone: ``forward(x) = layer(x, residual=False)``."""

    def __init__(self, layer: EdgePrototypeAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, residual=False)


def _gained(dtype: torch.dtype, shape: tuple[int, ...] = (2, 5, 4, 3)) -> Call:
    call = _call(shape, dtype, temperature=0.5)
    return Call(call.args, {**call.kwargs, "gain": torch.tensor(0.7, dtype=dtype, requires_grad=True)})


# --- EPA's own tests: hand-computed values, the container in the loop, the gate ---------------


def test_smoke() -> None:
    epa = _ready()
    x = torch.randn(2, 8, 6, 5)
    out = epa(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


# --- hand-computed values --------------------------------------------------------------------------


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


def test_an_all_zero_pixel_has_a_finite_gradient_equal_to_the_dense_one() -> None:
    # The per-pixel norm is a sum of squares under a square root (fast on CPU); at a zero pixel
    # an unguarded sqrt would give 0 * inf = NaN in backward where x.norm() gives 0.
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    x[0, :, 1, 2] = 0.0
    x[1, :, 0, 0] = 1e-9  # below eps = 1e-6: clamped, so no gradient through the norm
    prototype = torch.randn(6, dtype=torch.float64)
    grads = []
    for op in (edge_prototype_attention, edge_prototype_attention_dense):
        xi, pi = x.clone().requires_grad_(), prototype.clone().requires_grad_()
        out = op(xi, pi)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads.append((out.detach(), xi.grad, pi.grad))
    for got, want in zip(*grads):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, **TOL64)


def test_float16_features_beyond_256_give_the_float32_answer() -> None:
    # squares of float16 values above 256 overflow; the float16 norm accumulates in float32
    x = torch.randn(2, 16, 5, 5) * 400
    prototype = torch.randn(16)
    want = edge_prototype_attention(x, prototype, residual=False)
    got = edge_prototype_attention(x.half(), prototype.half(), residual=False)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())


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


# --- the container in the loop: gradients, initialisation, state -----------------------------------


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


def test_train_and_eval_agree() -> None:
    epa = _ready()
    x = torch.randn(1, 8, 4, 4)
    torch.testing.assert_close(epa.train()(x), epa.eval()(x))


def test_owns_a_container() -> None:
    epa = EdgePrototypeAttention(8, slots=5)
    assert isinstance(epa.container, AdaptiveEdgeContainer)
    assert (epa.container.channels, epa.container.slots) == (8, 5)
    assert {name for name, _ in epa.named_parameters()} == {"container.mixer.weight", "container.mixer.bias"}


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_compiled_once_stays_right_when_the_container_initializes() -> None:
    # one compiled graph before and after the flag flips (the shared check compiles per case)
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


# --- residual=False: the term alone (values and gradients: reference and gradcheck cases) ----------


@pytest.mark.parametrize("rescale", [True, False])
def test_x_plus_the_term_is_the_default_output(rescale: bool) -> None:
    x = torch.randn(3, 6, 5, 7, dtype=torch.float64)
    prototype = torch.randn(6, dtype=torch.float64)
    term = edge_prototype_attention(x, prototype, temperature=0.7, rescale=rescale, residual=False)
    full = edge_prototype_attention(x, prototype, temperature=0.7, rescale=rescale)
    torch.testing.assert_close(x + term, full, **TOL64)


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


# --- the gate (a deviation: gamma * F_e, gamma learnable from 0) -----------------------------------


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
