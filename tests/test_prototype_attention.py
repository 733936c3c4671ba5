"""ForegroundPrototypeAttention: the shared checklist (tests/op_tester.py) and FPA's own tests."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from cscpa_layers import (
    ForegroundPrototypeAttention,
    channel_prototypes,
    correlation_map,
    foreground_prototype_attention,
)
import cscpa_layers._shared_score_attention as shared_module
import cscpa_layers.prototype_attention as fpa_module
from cscpa_layers._prototype_tokens import prototype_tokens
from cscpa_layers._shared_score_attention import shared_score_attention
from cscpa_layers._reference.prototype_attention import (
    channel_prototypes_dense,
    correlation_map_dense,
    foreground_prototype_attention_dense,
)
from tests.conftest import TOLERANCES
from tests.op_tester import BadInput, Call, Case, ModuleCase, OpTester, ReprCase, RunCase, StateCase

VALUES = ("self", "partner")
PAIRINGS = ("halves", "self", "explicit")
TOL64 = TOLERANCES[torch.float64]


def _params(layer: ForegroundPrototypeAttention) -> tuple[torch.Tensor, ...]:
    return (
        layer.key.weight,
        layer.key.bias,
        layer.value.weight,
        layer.value.bias,
        layer.out.weight,
        layer.out.bias,
    )


def _dense(layer: ForegroundPrototypeAttention, x: torch.Tensor, partner: torch.Tensor | None) -> torch.Tensor:
    return foreground_prototype_attention_dense(
        x, partner, *_params(layer), values=layer.values, eps=layer.eps, kv_stride=layer.kv_stride
    )


def _call(layer: ForegroundPrototypeAttention, x: torch.Tensor, partner: torch.Tensor | None, **kwargs: object) -> Call:
    """The function call that ``layer(x, partner)`` makes in training."""
    options = {"values": layer.values, "eps": layer.eps, "kv_stride": layer.kv_stride, **kwargs}
    return Call((x, partner, *_params(layer)), options)


def _paired(
    pairing: str, dtype: torch.dtype, *, values: str = "self", kv_stride: int = 1, shape: tuple[int, ...] = (2, 6, 3, 4),
    key_channels: int = 4, grad: bool = True, **kwargs: object,
) -> Call:
    """A call in one of the three pairings: the batch halves, x with itself, an explicit partner."""
    layer = ForegroundPrototypeAttention(shape[1], key_channels=key_channels, values=values, kv_stride=kv_stride)
    layer = layer.to(dtype).requires_grad_(grad)
    x = torch.randn(*shape, dtype=dtype, requires_grad=grad)
    partner = {"halves": None, "self": x, "explicit": torch.randn(*shape, dtype=dtype, requires_grad=grad)}[pairing]
    return _call(layer, x, partner, **kwargs)


@st.composite
def fpa_cases(draw: st.DrawFn) -> tuple[int, int, int, int, torch.dtype]:
    b = 2 * draw(st.integers(1, 3))
    c = draw(st.integers(1, 24))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12).filter(lambda v: v != h) | st.just(h))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return b, c, h, w, dtype


@st.composite
def halves_calls(draw: st.DrawFn, strides: st.SearchStrategy[int] = st.just(1)) -> Call:
    """Random sizes and dtypes, the batch halves paired."""
    b, c, h, w, dtype = draw(fpa_cases())
    layer = ForegroundPrototypeAttention(c, values=draw(st.sampled_from(VALUES)), kv_stride=draw(strides)).to(dtype)
    return _call(layer, torch.randn(b, c, h, w, dtype=dtype), None)


@st.composite
def partner_calls(draw: st.DrawFn) -> Call:
    """values="partner" with a partner of another spatial size."""
    b, c = draw(st.integers(1, 3)), draw(st.integers(1, 8))
    size, partner_size = (draw(st.tuples(st.integers(1, 6), st.integers(1, 6))) for _ in range(2))
    layer = ForegroundPrototypeAttention(c, values="partner").double()
    x = torch.randn(b, c, *size, dtype=torch.float64)
    return _call(layer, x, torch.randn(b, c, *partner_size, dtype=torch.float64))


def _bad_call(**change: object) -> object:
    """foreground_prototype_attention on a valid (2, 4, 2, 2) call with ``change`` applied."""
    layer = ForegroundPrototypeAttention(4)
    params = dict(zip(("key_weight", "key_bias", "value_weight", "value_bias", "out_weight", "out_bias"), _params(layer)))
    arguments: dict[str, object] = {"x": torch.randn(2, 4, 2, 2), "partner": None, **params, **change}
    return foreground_prototype_attention(**arguments)  # type: ignore[arg-type]


class TestForegroundPrototypeAttentionOp(OpTester):
    function = staticmethod(foreground_prototype_attention)
    reference = staticmethod(foreground_prototype_attention_dense)

    def bad_inputs(self) -> list[BadInput]:
        layer = ForegroundPrototypeAttention
        cases = [
            BadInput("odd-batch-halves", lambda: layer(4)(torch.randn(3, 4, 2, 2)), ValueError, r"even batch size, got B=3"),
            *(
                BadInput(f"rank-{len(shape)}", lambda shape=shape: layer(4)(torch.randn(*shape)), ValueError,
                         r"x must be 4-D \(B, C, H, W\), got \d-D")
                for shape in [(4, 2, 2), (2, 4, 2, 2, 1), (4,)]
            ),
            BadInput("channels", lambda: layer(4)(torch.randn(2, 3, 2, 2)), ValueError, r"x must have 4 channels .* got 3"),
            BadInput("partner-size-under-self-values", lambda: layer(4, values="self")(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 3, 2)),
                     ValueError, r"spatial size of x, \(H, W\) = \(2, 2\), got \(3, 2\)"),
            BadInput("partner-batch", lambda: layer(4, values="partner")(torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2)),
                     ValueError, r"batch size and channels of x, \(B, C\) = \(2, 4\), got \(3, 4\)"),
            BadInput("values", lambda: layer(4, values="query"), ValueError, r"values must be one of 'self', 'partner', got 'query'"),
            BadInput("eval_pairing", lambda: layer(4, eval_pairing="mean"), ValueError,
                     r"eval_pairing must be one of 'identity', 'self', got 'mean'"),
            BadInput("key_channels", lambda: layer(4, key_channels=0), ValueError, r"key_channels must be a positive int, got 0"),
            BadInput("kernel", lambda: layer(4, kernel="flash"), ValueError, r"kernel must be one of 'auto', 'sdpa', 'shared', got 'flash'"),
            BadInput("kernel-shared-with-partner", lambda: layer(4, kernel="shared")(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)),
                     ValueError, r"kernel='shared' needs the batch halves paired \(partner=None\) and kv_stride=1, got partner=a tensor"),
            BadInput("kernel-shared-with-kv_stride", lambda: layer(4, kernel="shared", kv_stride=2)(torch.randn(2, 4, 2, 2)),
                     ValueError, r"kernel='shared' needs .* got partner=None and kv_stride=2"),
            BadInput("kv_stride", lambda: layer(4, kv_stride=0), ValueError, r"kv_stride must be a positive int, got 0"),
            BadInput("kv_stride-type", lambda: layer(4, kv_stride=2.0), TypeError, r"kv_stride must be an int, got float"),  # type: ignore[arg-type]
            BadInput("channels-type", lambda: layer(4.0), TypeError, r"channels must be an int, got float"),  # type: ignore[arg-type]
            BadInput("x-type", lambda: layer(4)([[1.0]]), TypeError, r"x must be a torch.Tensor, got list"),  # type: ignore[arg-type]
            BadInput("x-integer", lambda: layer(4)(torch.ones(2, 4, 2, 2, dtype=torch.long)), ValueError,
                     r"x must be a floating-point tensor, got dtype torch.int64"),
            BadInput("value_weight-shape", lambda: _bad_call(value_weight=torch.randn(3, 4)), ValueError,
                     r"value_weight must have shape \(d, C\) = \(2, 4\), got \(3, 4\)"),
            BadInput("residual-module", lambda: layer(4)(torch.randn(2, 4, 2, 2), residual=0), TypeError,  # type: ignore[arg-type]
                     r"residual must be a bool, got int"),
            BadInput("residual-function", lambda: _bad_call(residual="no"), TypeError, r"residual must be a bool, got str"),
        ]
        # eps = 0 would let all-zero features divide by 0; the layer, the function and
        # correlation_map check it alike
        x = torch.randn(2, 4, 2, 2)
        for eps, error, message in [
            (0.0, ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
            (-1e-6, ValueError, r"eps must be in \(0.0, inf\], got -1e-06"),
            ("1e-6", TypeError, r"eps must be a number, got str"),
            (None, TypeError, r"eps must be a number, got NoneType"),
        ]:
            cases += [
                BadInput(f"eps-{eps}-module", lambda eps=eps: layer(4, eps=eps), error, message),  # type: ignore[arg-type]
                BadInput(f"eps-{eps}-function", lambda eps=eps: _bad_call(eps=eps), error, message),
                BadInput(f"eps-{eps}-correlation_map", lambda eps=eps: correlation_map(channel_prototypes(x), x, eps=eps),  # type: ignore[arg-type]
                         error, message),
            ]
        return cases

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {
            "halves": halves_calls(),
            "partner-of-other-size": partner_calls(),
            "kv_stride": halves_calls(st.integers(2, 4)),
        }

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        x = call.args[0]
        assert out.shape == x.shape and out.dtype == x.dtype

    def reference_cases(self) -> list[Case]:
        big = {"shape": (4, 16, 7, 9), "key_channels": 8}
        cases = [
            Case(f"{pairing}-{values}", lambda dtype, p=pairing, v=values: _paired(p, dtype, values=v, **big))
            for pairing in ("halves", "explicit")
            for values in VALUES
        ]
        cases += [
            Case(f"kv_stride-{s}-{values}", lambda dtype, s=s, v=values: _paired("halves", dtype, values=v, kv_stride=s, **big))
            for s in (2, 3)
            for values in VALUES
        ]
        cases.append(Case("kv_stride-partner-of-other-size", lambda dtype: _partner_of_other_size(dtype)))
        # residual=False: the term F_f alone, in every pairing, exact and pooled
        cases += [
            Case(f"residual-false-{pairing}-{values}-kv{s}",
                 lambda dtype, p=pairing, v=values, s=s: _paired(p, dtype, values=v, kv_stride=s, shape=(2, 6, 3, 5), residual=False))
            for pairing in PAIRINGS
            for values in VALUES
            for s in (1, 2)
        ]
        return cases

    def gradcheck_cases(self) -> list[Case]:
        cases = [
            Case(f"{pairing}-{values}-kv{s}",
                 lambda p=pairing, v=values, s=s: _paired(p, torch.float64, values=v, kv_stride=s,
                                                          shape=(2, 6, 3, 4) if s == 1 else (2, 6, 3, 5)))  # odd: partial windows
            for pairing in PAIRINGS
            for values in VALUES
            for s in (1, 2)
        ]
        cases.append(Case("residual-false", lambda: _paired("halves", torch.float64, residual=False)))
        return cases

    def module_cases(self) -> list[ModuleCase]:
        def case(x_shape: tuple[int, ...], partner: bool = False, **kwargs: object) -> tuple[nn.Module, Call]:
            residual = kwargs.pop("residual", True)
            layer = ForegroundPrototypeAttention(8, **kwargs)  # type: ignore[arg-type]
            x = torch.randn(*x_shape)
            other = torch.randn(*x_shape) if partner else None
            return layer, Call((x, other), {"residual": residual})

        return [
            ModuleCase("default", lambda: case((4, 8, 3, 5))),
            ModuleCase("values-partner", lambda: case((4, 8, 3, 5), values="partner")),
            ModuleCase("explicit-partner", lambda: case((3, 8, 3, 5), partner=True)),
            ModuleCase("kv_stride-2", lambda: case((4, 8, 5, 5), kv_stride=2, eps=1e-5)),
            ModuleCase("residual-false", lambda: case((4, 8, 3, 5), residual=False)),
        ]

    def module_as_function(self, module: nn.Module) -> object:
        assert isinstance(module, ForegroundPrototypeAttention) and module.training
        return lambda x, partner=None, *, residual=True: foreground_prototype_attention(
            x, partner, *_params(module), values=module.values, eps=module.eps, kv_stride=module.kv_stride,
            residual=residual,
        )

    def repr_cases(self) -> list[ReprCase]:
        return [
            ReprCase("every-option",
                     lambda: ForegroundPrototypeAttention(8, key_channels=2, values="partner", eval_pairing="self", eps=1e-5),
                     ("channels=8", "key_channels=2", "values='partner'", "eval_pairing='self'", "eps=1e-05")),
            # kv_stride is shown only when it is not the paper's 1
            ReprCase("kv_stride", lambda: ForegroundPrototypeAttention(4, kv_stride=2), ("kv_stride=2",)),
            ReprCase("kv_stride-default", lambda: ForegroundPrototypeAttention(4), ("channels=4",), absent=("kv_stride",)),
            # kernel is shown only when it is not "auto"
            ReprCase("kernel", lambda: ForegroundPrototypeAttention(4, kernel="sdpa"), ("kernel='sdpa'",)),
            ReprCase("kernel-default", lambda: ForegroundPrototypeAttention(4), ("channels=4",), absent=("kernel",)),
        ]

    def state_cases(self) -> list[StateCase]:
        def build() -> tuple[nn.Module, nn.Module, object]:
            x = torch.randn(2, 8, 4, 4)
            return ForegroundPrototypeAttention(8, values="partner"), ForegroundPrototypeAttention(8, values="partner"), lambda m: m(x)

        return [StateCase("values-partner", build)]  # type: ignore[arg-type]

    def compile_cases(self) -> list[RunCase]:
        def build(shape: tuple[int, ...], **kwargs: object) -> tuple[nn.Module, Call]:
            residual = kwargs.pop("residual", True)
            layer = ForegroundPrototypeAttention(8, **kwargs)  # type: ignore[arg-type]
            return (layer if residual else _TermOnly(layer)), Call((torch.randn(*shape, requires_grad=True),))

        return [
            RunCase("default", lambda: build((4, 8, 5, 6))),
            RunCase("kv_stride-2", lambda: build((4, 8, 5, 7), kv_stride=2)),
            RunCase("residual-false", lambda: build((4, 8, 5, 6), residual=False)),
        ]

    def device_cases(self) -> list[RunCase]:
        def build(kv_stride: int) -> tuple[nn.Module, Call]:
            layer = ForegroundPrototypeAttention(64, kv_stride=kv_stride)
            return layer, Call((torch.randn(4, 64, 15, 17, requires_grad=True),))  # odd: partial windows too

        # the fused kernels only: a fallback to the math kernel would raise
        fused = lambda: sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION])  # noqa: E731
        return [
            RunCase(f"kv{s}-{str(dtype).removeprefix('torch.')}", lambda s=s: build(s), dtype=dtype, context=fused,
                    tol={"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 1e-1, "rtol": 5e-2},
                    loss=lambda out: out.sum())
            for s in (1, 2)
            for dtype in (torch.float16, torch.bfloat16, torch.float32)
        ]

    def degenerate_cases(self) -> list[Case]:
        def call(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, *, zeros: bool = False, scale: float = 1.0,
                 partner: bool = False, **kwargs: object) -> Call:
            layer = ForegroundPrototypeAttention(shape[1], **kwargs).to(dtype)  # type: ignore[arg-type]
            x = torch.zeros(*shape, dtype=dtype) if zeros else scale * torch.randn(*shape, dtype=dtype)
            other = torch.randn(*shape, dtype=dtype) if partner else None
            return _call(layer, x.requires_grad_(), other)

        loose32 = {"atol": 1e-5, "rtol": 1.3e-6}  # assert_close's float32 default
        return [
            Case("all-zero-features", lambda: call((2, 8, 4, 4), zeros=True)),
            Case("1x1", lambda: call((2, 4, 1, 1), torch.float64), reference=True, gradcheck=True),
            Case("empty-batch", lambda: call((0, 4, 3, 3)), shape=(0, 4, 3, 3)),
            Case("empty-map", lambda: call((2, 4, 0, 3)), shape=(2, 4, 0, 3)),
            Case("large-magnitudes", lambda: call((2, 8, 5, 5), scale=1e4)),
            Case("odd-batch-explicit-partner", lambda: call((3, 4, 2, 3), torch.float64, partner=True), reference=True),
            Case("kv_stride-1x1", lambda: call((2, 4, 1, 1), kv_stride=2), reference=True, tol=loose32),
            Case("kv_stride-empty-batch", lambda: call((0, 4, 3, 3), kv_stride=2), shape=(0, 4, 3, 3)),
        ]


class _TermOnly(nn.Module):
    """FPA in a model that adds its term alone: ``forward(x) = layer(x, residual=False)``."""

    def __init__(self, layer: ForegroundPrototypeAttention) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x, residual=False)


def _partner_of_other_size(dtype: torch.dtype) -> Call:
    layer = ForegroundPrototypeAttention(5, values="partner", kv_stride=2).to(dtype)
    x = torch.randn(2, 5, 4, 6, dtype=dtype, requires_grad=True)
    return _call(layer, x, torch.randn(2, 5, 7, 3, dtype=dtype, requires_grad=True))


# --- FPA's own tests: hand-computed values, pairings, kv_stride, precision ---------------------


def test_smoke() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.randn(4, 8, 6, 5)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)  # training pairs the halves, so F_f is added


# --- hand-computed values --------------------------------------------------------------------------


def test_prototypes_of_a_constant_map_are_the_mean_feature() -> None:
    # Constant channels give a uniform spatial softmax, so every prototype is the mean pixel.
    x = torch.zeros(1, 2, 2, 2)
    x[0, 0] = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    x[0, 1] = torch.tensor([[2.0, 2.0], [2.0, 2.0]])
    expected = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]])
    torch.testing.assert_close(channel_prototypes(x), expected)


def test_prototype_follows_the_peak_of_its_channel() -> None:
    # Channel 0 peaks sharply at pixel 0, so prototype 0 is (almost) pixel 0's feature vector.
    x = torch.tensor([[[[50.0, 0.0, 0.0]], [[1.0, 2.0, 3.0]]]])  # (1, 2, 1, 3)
    protos = channel_prototypes(x)
    torch.testing.assert_close(protos[0, 0], torch.tensor([50.0, 1.0]), atol=1e-4, rtol=0)
    # Channel 1's softmax over (1, 2, 3) weighs the pixels by e^1 : e^2 : e^3.
    weights = torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0)
    torch.testing.assert_close(protos[0, 1], torch.stack([weights @ x[0, 0, 0], weights @ x[0, 1, 0]]))


def test_correlation_is_cosine() -> None:
    x = torch.tensor([[[[3.0, 0.0]], [[4.0, 1.0]]]])  # pixels (3, 4) and (0, 1)
    protos = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    phi = correlation_map(protos, x)
    expected = torch.tensor([[[[0.6, 0.0]], [[0.8, 1.0]]]])
    torch.testing.assert_close(phi, expected)


def test_prototype_tokens_returns_keys_alone_or_keys_and_values() -> None:
    # what its @overloads promise mypy: a Tensor without value weights, a pair with them
    layer = ForegroundPrototypeAttention(6, key_channels=4)
    x = torch.randn(2, 6, 12)
    keys = prototype_tokens(x, layer.key.weight, layer.key.bias)
    assert isinstance(keys, torch.Tensor) and keys.shape == (2, 12, 4)
    pair = prototype_tokens(x, layer.key.weight, layer.key.bias, layer.value.weight, layer.value.bias)
    assert isinstance(pair, tuple) and len(pair) == 2
    torch.testing.assert_close(pair[0], keys, rtol=0, atol=0)
    assert pair[1].shape == (2, 12, 4)


def test_functional_pieces_match_dense() -> None:
    x = torch.randn(3, 5, 4, 6, dtype=torch.float64)
    torch.testing.assert_close(channel_prototypes(x), channel_prototypes_dense(x))
    torch.testing.assert_close(correlation_map(channel_prototypes(x), x), correlation_map_dense(x))


def test_every_parameter_receives_gradient() -> None:
    layer = ForegroundPrototypeAttention(8)
    layer(torch.randn(2, 8, 4, 4)).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- pairings --------------------------------------------------------------------------------------


def test_halves_pairing_matches_explicit_swapped_partner() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.randn(4, 8, 5, 5)
    swapped = torch.cat([x[2:], x[:2]])
    torch.testing.assert_close(layer(x), layer(x, swapped))


def test_each_image_depends_only_on_its_partner() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.randn(4, 8, 5, 5)
    y = x.clone()
    y[3] += 1.0  # image 3 is the partner of image 1 only
    changed = (layer(x) - layer(y)).flatten(1).abs().amax(1) > 0
    assert changed.tolist() == [False, True, False, True]


def test_eval_identity_returns_input() -> None:
    layer = ForegroundPrototypeAttention(8, eval_pairing="identity").eval()
    x = torch.randn(1, 8, 5, 4)
    assert torch.equal(layer(x), x)


def test_eval_self_pairs_each_image_with_itself() -> None:
    layer = ForegroundPrototypeAttention(8, eval_pairing="self").double().eval()
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)  # odd batch is fine in eval
    out = layer(x)
    torch.testing.assert_close(out, _dense(layer, x, x))
    torch.testing.assert_close(out[1:2], layer(x[1:2]))  # independent of the rest of the batch


def test_eval_with_explicit_partner_uses_it() -> None:
    layer = ForegroundPrototypeAttention(8).double().eval()
    x = torch.randn(1, 8, 5, 4, dtype=torch.float64)
    partner = torch.randn(1, 8, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x, partner), _dense(layer, x, partner))


# --- residual=False: the term F_f alone (its values and gradients are reference and gradcheck cases) ---


@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("values", VALUES)
@pytest.mark.parametrize("pairing", PAIRINGS)
def test_x_plus_the_term_is_the_default_output(pairing: str, values: str, kv_stride: int) -> None:
    layer = ForegroundPrototypeAttention(6, key_channels=4, values=values, kv_stride=kv_stride).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    other = {"halves": None, "self": x, "explicit": torch.randn(2, 6, 3, 5, dtype=torch.float64)}[pairing]
    term = layer(x, other, residual=False)
    torch.testing.assert_close(x + term, layer(x, other), **TOL64)
    assert term.abs().amax() > 1e-3  # a real term, not x cancelled to 0


def test_residual_false_in_eval() -> None:
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    skipped = ForegroundPrototypeAttention(8, eval_pairing="identity").double().eval()
    assert torch.equal(skipped(x, residual=False), torch.zeros_like(x))  # FPA skipped: F_f = 0
    paired = ForegroundPrototypeAttention(8, eval_pairing="self").double().eval()
    torch.testing.assert_close(paired(x, residual=False), _dense(paired, x, x) - x, **TOLERANCES[torch.float64])


# --- width, precision and kernels ------------------------------------------------------------------


def test_default_key_channels_halve_the_width() -> None:
    layer = ForegroundPrototypeAttention(512)
    assert (layer.key.out_features, layer.value.out_features, layer.out.in_features) == (256, 256, 256)
    assert ForegroundPrototypeAttention(1).key_channels == 1


def test_autocast_bfloat16_runs_and_backpropagates() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.randn(2, 8, 5, 5, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.float32
    ref = _dense(layer.double(), x.detach().double(), None)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[torch.bfloat16])


@pytest.mark.parametrize("kv_stride", [1, 2, 3])
def test_cpu_runs_on_the_flash_kernel_alone(kv_stride: int) -> None:
    # With only FLASH_ATTENTION allowed, a fallback to the math kernel (which materialises the
    # N x N matrix) would raise instead of running silently. With kv_stride the pooled keys and
    # values must keep a unit stride along d for that (they once did not: the math kernel ran).
    layer = ForegroundPrototypeAttention(8, kv_stride=kv_stride, kernel="sdpa")  # on CPU "auto" shares the scores
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        layer(x).sum().backward()
    assert x.grad is not None


# --- kv_stride: keys and values from s x s windows (our deviation for large crops) -----------------


def test_kv_stride_changes_the_output_and_one_is_exact_fpa() -> None:
    torch.manual_seed(0)
    exact = ForegroundPrototypeAttention(8)
    pooled = ForegroundPrototypeAttention(8, kv_stride=2)
    pooled.load_state_dict(exact.state_dict())  # no new parameters: checkpoints load both ways
    x = torch.randn(4, 8, 6, 6)
    assert (exact(x) - pooled(x)).abs().max() > 1e-3  # the windows really change the attention
    unit = ForegroundPrototypeAttention(8, kv_stride=1)
    unit.load_state_dict(exact.state_dict())
    torch.testing.assert_close(unit(x), exact(x), rtol=0, atol=0)


def test_kv_stride_of_a_map_pooled_to_one_token_is_the_mean_value() -> None:
    # One window covers the whole partner map: softmax over one key is 1, so every query reads
    # the mean value token, and the update is the same at every pixel.
    layer = ForegroundPrototypeAttention(4, kv_stride=8).double()
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    update = layer(x) - x
    torch.testing.assert_close(update, update[:, :, :1, :1].expand_as(update))


def test_half_precision_tokens_survive_features_whose_squares_overflow() -> None:
    # float16 squares overflow above 256; the per-pixel norm must not (it once was (x * x).sum)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 12, generator=gen) * 600.0  # |x_n| up to ~1700
    weight, bias = torch.randn(4, 8, generator=gen), torch.zeros(4)
    half = prototype_tokens(x.half(), weight.half(), bias.half())
    full = prototype_tokens(x, weight, bias)
    assert torch.isfinite(half).all()
    torch.testing.assert_close(half.float(), full, atol=2e-2, rtol=2e-2)


# --- kernel="shared": both directions of a pair from one score matrix ------------------------------


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles of a few scores, so that both softmaxes really run online over several tiles and
    the last tiles are partial (the layer's own sizes fit one tile)."""
    monkeypatch.setattr(shared_module, "TILE_ELEMENTS", 64)


def _both_kernels(values: str, dtype: torch.dtype, shape: tuple[int, ...] = (4, 6, 3, 5)) -> tuple[Call, Call]:
    """The same halves-paired call with kernel="shared" and kernel="sdpa"."""
    torch.manual_seed(0)
    layer = ForegroundPrototypeAttention(shape[1], key_channels=4, values=values).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    return _call(layer, x, None, kernel="shared"), _call(layer, x, None, kernel="sdpa")


def _value_and_grads(call: Call) -> tuple[torch.Tensor, ...]:
    inputs = [t.detach().requires_grad_() if isinstance(t, torch.Tensor) else t for t in call.args]
    out = foreground_prototype_attention(*inputs, **call.kwargs)  # type: ignore[arg-type]
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)  # not a plain sum: x's gradient would cancel
    grads = torch.autograd.grad((out * weights).sum(), [t for t in inputs if isinstance(t, torch.Tensor)])
    return (out, *grads)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("values", VALUES)
def test_shared_kernel_equals_sdpa_over_many_tiles(values: str) -> None:
    assert shared_module._tile(2, 15) == 5  # 3 x 3 tiles
    shared, sdpa = _both_kernels(values, torch.float64)
    for got, want in zip(_value_and_grads(shared), _value_and_grads(sdpa)):
        torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("partner_values", [False, True])
def test_shared_kernel_gradcheck_over_many_tiles(partner_values: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    # large scores: the running maxima grow from tile to tile and rescale the sums
    query = (4 * torch.randn(4, 7, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    value = torch.randn(4, 7, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert shared_module._tile(2, 7) == 5  # 2 x 2 tiles, three of them partial
    torch.autograd.gradcheck(lambda q, v: shared_score_attention(q, v, partner_values=partner_values), (query, value))


@pytest.mark.usefixtures("small_tiles")
@pytest.mark.parametrize("values", VALUES)
def test_shared_kernel_equals_sdpa_on_large_scores(values: str) -> None:
    # scores in the hundreds: each tile holds maxima far above the previous tiles'
    gen = torch.Generator().manual_seed(1)
    query = 12 * torch.randn(4, 15, 5, generator=gen, dtype=torch.float64)
    value = torch.randn(4, 15, 5, generator=gen, dtype=torch.float64)
    v = value.roll(2, 0) if values == "partner" else value
    want = F.scaled_dot_product_attention(query[:, None], query.roll(2, 0)[:, None], v[:, None]).squeeze(1)
    got = shared_score_attention(query, value, partner_values=values == "partner")
    torch.testing.assert_close(got, want, **TOL64)


@pytest.mark.usefixtures("small_tiles")
def test_shared_kernel_in_bfloat16_is_as_close_to_float64_as_sdpa() -> None:
    # bfloat16 products with float32 statistics and sums over the tiles
    shared, sdpa = _both_kernels("self", torch.bfloat16, shape=(4, 16, 4, 6))
    exact = _value_and_grads(_both_kernels("self", torch.float64, shape=(4, 16, 4, 6))[1])
    for got, other, want in zip(_value_and_grads(shared), _value_and_grads(sdpa), exact):
        error = (got.double() - want).norm() / want.norm()
        assert error < 1.5 * ((other.double() - want).norm() / want.norm()) + 1e-3


def test_auto_kernel_shares_scores_on_cpu_where_it_applies(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[torch.dtype] = []

    def spy(query: torch.Tensor, value: torch.Tensor, *, partner_values: bool) -> torch.Tensor:
        calls.append(query.dtype)
        return shared_score_attention(query, value, partner_values=partner_values)

    monkeypatch.setattr(fpa_module, "shared_score_attention", spy)
    x = torch.randn(2, 8, 3, 3)
    layer = ForegroundPrototypeAttention(8)
    layer(x)  # halves, float32
    layer.bfloat16()(x.bfloat16())  # halves, bfloat16
    layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)  # the tokens are float32, the attention runs in autocast's dtype
    assert calls == [torch.float32, torch.bfloat16, torch.bfloat16]
    layer(x, torch.randn(2, 8, 3, 3))  # an explicit partner: one direction, SDPA
    ForegroundPrototypeAttention(8, kv_stride=2)(x)  # pooled keys: the scores are not transposes
    ForegroundPrototypeAttention(8, kernel="sdpa")(x)
    ForegroundPrototypeAttention(8).half()(x.half())  # CPU float16 products are slow
    assert len(calls) == 3


def test_shared_kernel_layer_in_eval_self_pairing_runs_sdpa() -> None:
    # eval_pairing="self" pairs each image with itself: one direction, no halves to share scores
    layer = ForegroundPrototypeAttention(8, eval_pairing="self", kernel="shared").double().eval()
    x = torch.randn(3, 8, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), _dense(layer, x, x), **TOL64)
