"""ForegroundPrototypeAttention: the style-rule-12 checklist, against the dense reference."""

from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel

from cscpa_layers import (
    ForegroundPrototypeAttention,
    channel_prototypes,
    correlation_map,
    foreground_prototype_attention,
)
from cscpa_layers._prototype_tokens import prototype_tokens
from cscpa_layers._reference.prototype_attention import (
    channel_prototypes_dense,
    correlation_map_dense,
    foreground_prototype_attention_dense,
)
from tests.conftest import DEVICES, TOLERANCES, compile_available


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


@st.composite
def fpa_cases(draw: st.DrawFn) -> tuple[int, int, int, int, torch.dtype]:
    b = 2 * draw(st.integers(1, 3))
    c = draw(st.integers(1, 24))
    h = draw(st.integers(1, 12))
    w = draw(st.integers(1, 12).filter(lambda v: v != h) | st.just(h))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    return b, c, h, w, dtype


# --- smoke and shapes -----------------------------------------------------------------------


def test_smoke() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.randn(4, 8, 6, 5)
    out = layer(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)  # training pairs the halves, so F_f is added


@given(fpa_cases(), st.sampled_from(["self", "partner"]))
def test_shape_dtype_and_reference_property(case: tuple[int, int, int, int, torch.dtype], values: str) -> None:
    b, c, h, w, dtype = case
    layer = ForegroundPrototypeAttention(c, values=values).to(dtype)
    x = torch.randn(b, c, h, w, dtype=dtype)
    out = layer(x)
    assert out.shape == (b, c, h, w)
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = _dense(layer.double(), x.double(), None)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])


@given(
    b=st.integers(1, 3),
    c=st.integers(1, 8),
    size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
    partner_size=st.tuples(st.integers(1, 6), st.integers(1, 6)),
)
def test_partner_values_allow_other_spatial_size(
    b: int, c: int, size: tuple[int, int], partner_size: tuple[int, int]
) -> None:
    layer = ForegroundPrototypeAttention(c, values="partner").double()
    x = torch.randn(b, c, *size, dtype=torch.float64)
    partner = torch.randn(b, c, *partner_size, dtype=torch.float64)
    out = layer(x, partner)
    assert out.shape == x.shape
    torch.testing.assert_close(out, _dense(layer, x, partner))


# --- hand-computed values -------------------------------------------------------------------


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


# --- gradients --------------------------------------------------------------------------------


@pytest.mark.parametrize("values", ["self", "partner"])
@pytest.mark.parametrize("pairing", ["halves", "self", "explicit"])
def test_gradcheck(values: str, pairing: str) -> None:
    layer = ForegroundPrototypeAttention(6, key_channels=4, values=values).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    partner = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, partner: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        other = {"halves": None, "self": x, "explicit": partner}[pairing]
        return foreground_prototype_attention(x, other, *params, values=values)

    params = tuple(p.detach().requires_grad_() for p in _params(layer))
    assert torch.autograd.gradcheck(fn, (x, partner, *params))


@pytest.mark.parametrize("values", ["self", "partner"])
@pytest.mark.parametrize("pairing", ["halves", "explicit"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_path_equals_dense_in_value_and_gradient(values: str, pairing: str, dtype: torch.dtype) -> None:
    layer = ForegroundPrototypeAttention(16, values=values).to(dtype)
    x = torch.randn(4, 16, 7, 9, dtype=dtype, requires_grad=True)
    partner = torch.randn(4, 16, 7, 9, dtype=dtype, requires_grad=True) if pairing == "explicit" else None
    inputs = [x, *([partner] if partner is not None else []), *layer.parameters()]
    upstream = torch.randn(4, 16, 7, 9, dtype=dtype)

    out = layer(x, partner)
    grads = torch.autograd.grad(out, inputs, upstream)
    ref = _dense(layer, x, partner)
    ref_grads = torch.autograd.grad(ref, inputs, upstream)

    torch.testing.assert_close(out, ref, **TOLERANCES[dtype])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[dtype])


def test_every_parameter_receives_gradient() -> None:
    layer = ForegroundPrototypeAttention(8)
    layer(torch.randn(2, 8, 4, 4)).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


# --- pairings ---------------------------------------------------------------------------------


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


# --- residual=False: the term F_f alone, for x + F_f + F_e -----------------------------------


@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("values", ["self", "partner"])
@pytest.mark.parametrize("pairing", ["halves", "self", "explicit"])
def test_residual_false_returns_the_term_alone(pairing: str, values: str, kv_stride: int) -> None:
    layer = ForegroundPrototypeAttention(6, key_channels=4, values=values, kv_stride=kv_stride).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64)
    other = {"halves": None, "self": x, "explicit": torch.randn(2, 6, 3, 5, dtype=torch.float64)}[pairing]
    term = layer(x, other, residual=False)
    torch.testing.assert_close(term, _dense(layer, x, other) - x, **TOLERANCES[torch.float64])
    torch.testing.assert_close(x + term, layer(x, other), **TOLERANCES[torch.float64])
    assert term.abs().amax() > 1e-3  # a real term, not x cancelled to 0


def test_residual_false_gradcheck() -> None:
    layer = ForegroundPrototypeAttention(6, key_channels=4).double()
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64, requires_grad=True)
    params = tuple(p.detach().requires_grad_() for p in _params(layer))
    assert torch.autograd.gradcheck(
        lambda x, *params: foreground_prototype_attention(x, None, *params, residual=False), (x, *params)
    )


def test_residual_false_in_eval() -> None:
    x = torch.randn(3, 8, 5, 4, dtype=torch.float64)
    skipped = ForegroundPrototypeAttention(8, eval_pairing="identity").double().eval()
    assert torch.equal(skipped(x, residual=False), torch.zeros_like(x))  # FPA skipped: F_f = 0
    paired = ForegroundPrototypeAttention(8, eval_pairing="self").double().eval()
    torch.testing.assert_close(paired(x, residual=False), _dense(paired, x, x) - x, **TOLERANCES[torch.float64])


def test_residual_must_be_a_bool() -> None:
    layer = ForegroundPrototypeAttention(4)
    x = torch.randn(2, 4, 2, 2)
    with pytest.raises(TypeError, match=r"residual must be a bool, got int"):
        layer(x, residual=0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"residual must be a bool, got str"):
        foreground_prototype_attention(x, None, *_params(layer), residual="no")  # type: ignore[arg-type]


# --- degenerate input -------------------------------------------------------------------------


def test_all_zero_features_stay_finite() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = torch.zeros(2, 8, 4, 4, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters())


def test_one_by_one_map() -> None:
    layer = ForegroundPrototypeAttention(4).double()
    x = torch.randn(2, 4, 1, 1, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(layer(x), _dense(layer, x, None))
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,))


def test_empty_batch_gives_empty_output() -> None:
    layer = ForegroundPrototypeAttention(4)
    x = torch.randn(0, 4, 3, 3, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 4, 3, 3)
    out.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


def test_large_magnitudes_stay_finite() -> None:
    layer = ForegroundPrototypeAttention(8)
    x = (1e4 * torch.randn(2, 8, 5, 5)).requires_grad_()
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()


# --- module, state and compilation ------------------------------------------------------------


def test_module_equals_function() -> None:
    layer = ForegroundPrototypeAttention(8, values="partner")
    x = torch.randn(4, 8, 3, 5)
    torch.testing.assert_close(layer(x), foreground_prototype_attention(x, None, *_params(layer), values="partner"))


def test_extra_repr_shows_every_hyper_parameter() -> None:
    text = repr(ForegroundPrototypeAttention(8, key_channels=2, values="partner", eval_pairing="self", eps=1e-5))
    for part in ("channels=8", "key_channels=2", "values='partner'", "eval_pairing='self'", "eps=1e-05"):
        assert part in text


def test_default_key_channels_halve_the_width() -> None:
    layer = ForegroundPrototypeAttention(512)
    assert (layer.key.out_features, layer.value.out_features, layer.out.in_features) == (256, 256, 256)
    assert ForegroundPrototypeAttention(1).key_channels == 1


def test_state_dict_round_trip() -> None:
    layer = ForegroundPrototypeAttention(8, values="partner")
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    clone = ForegroundPrototypeAttention(8, values="partner")
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, 8, 4, 4)
    torch.testing.assert_close(clone(x), layer(x))


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_compiled_equals_eager() -> None:
    layer = ForegroundPrototypeAttention(8)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 8, 5, 6, requires_grad=True)
    eager_out = layer(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *layer.parameters()])
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


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
    layer = ForegroundPrototypeAttention(8, kv_stride=kv_stride)
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        layer(x).sum().backward()
    assert x.grad is not None


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
@pytest.mark.parametrize("kv_stride", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_cuda_uses_fused_kernels_and_equals_cpu(dtype: torch.dtype, kv_stride: int) -> None:
    layer = ForegroundPrototypeAttention(64, kv_stride=kv_stride)
    x = torch.randn(4, 64, 15, 17, requires_grad=True)  # odd: kv_stride's partial windows too
    cpu_out = layer(x)
    cpu_grad = torch.autograd.grad(cpu_out.sum(), x)[0]
    layer_cuda = layer.to("cuda", dtype)
    x_cuda = x.detach().to("cuda", dtype).requires_grad_()
    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    with sdpa_kernel(backends):
        out = layer_cuda(x_cuda)
        grad = torch.autograd.grad(out.sum(), x_cuda)[0]
    tol = {"atol": 1e-3, "rtol": 1e-3} if dtype == torch.float32 else {"atol": 1e-1, "rtol": 5e-2}
    torch.testing.assert_close(out.float().cpu(), cpu_out, **tol)
    torch.testing.assert_close(grad.float().cpu(), cpu_grad, **tol)


# --- bad input --------------------------------------------------------------------------------


def test_odd_batch_in_training_without_partner_raises() -> None:
    with pytest.raises(ValueError, match=r"even batch size, got B=3"):
        ForegroundPrototypeAttention(4)(torch.randn(3, 4, 2, 2))


@pytest.mark.parametrize("shape", [(4, 2, 2), (2, 4, 2, 2, 1), (4,)])
def test_wrong_rank_raises(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"x must be 4-D \(B, C, H, W\), got \d-D"):
        ForegroundPrototypeAttention(4)(torch.randn(*shape))


def test_wrong_channel_count_raises() -> None:
    with pytest.raises(ValueError, match=r"x must have 4 channels .* got 3"):
        ForegroundPrototypeAttention(4)(torch.randn(2, 3, 2, 2))


def test_partner_of_other_size_under_self_values_raises() -> None:
    layer = ForegroundPrototypeAttention(4, values="self")
    with pytest.raises(ValueError, match=r"spatial size of x, \(H, W\) = \(2, 2\), got \(3, 2\)"):
        layer(torch.randn(2, 4, 2, 2), torch.randn(2, 4, 3, 2))


def test_partner_of_other_batch_raises() -> None:
    with pytest.raises(ValueError, match=r"batch size and channels of x, \(B, C\) = \(2, 4\), got \(3, 4\)"):
        ForegroundPrototypeAttention(4, values="partner")(torch.randn(2, 4, 2, 2), torch.randn(3, 4, 2, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"values": "query"}, r"values must be one of 'self', 'partner', got 'query'"),
        ({"eval_pairing": "mean"}, r"eval_pairing must be one of 'identity', 'self', got 'mean'"),
        ({"key_channels": 0}, r"key_channels must be a positive int, got 0"),
        ({"kv_stride": 0}, r"kv_stride must be a positive int, got 0"),
    ],
)
def test_bad_options_raise(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ForegroundPrototypeAttention(4, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("eps", "error", "message"),
    [
        (0.0, ValueError, r"eps must be in \(0.0, inf\], got 0.0"),
        (-1e-6, ValueError, r"eps must be in \(0.0, inf\], got -1e-06"),
        ("1e-6", TypeError, r"eps must be a number, got str"),
        (None, TypeError, r"eps must be a number, got NoneType"),
    ],
)
def test_bad_eps_raises(eps: object, error: type[Exception], message: str) -> None:
    # eps = 0 would let all-zero features divide by 0; the layer, the function and
    # correlation_map check it alike
    layer = ForegroundPrototypeAttention(4)
    x = torch.randn(2, 4, 2, 2)
    with pytest.raises(error, match=message):
        ForegroundPrototypeAttention(4, eps=eps)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        foreground_prototype_attention(x, None, *_params(layer), eps=eps)  # type: ignore[arg-type]
    with pytest.raises(error, match=message):
        correlation_map(channel_prototypes(x), x, eps=eps)  # type: ignore[arg-type]


def test_bad_types_raise_type_error() -> None:
    with pytest.raises(TypeError, match=r"channels must be an int, got float"):
        ForegroundPrototypeAttention(4.0)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"x must be a torch.Tensor, got list"):
        ForegroundPrototypeAttention(4)([[1.0]])  # type: ignore[arg-type]


def test_integer_features_raise() -> None:
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor, got dtype torch.int64"):
        ForegroundPrototypeAttention(4)(torch.ones(2, 4, 2, 2, dtype=torch.long))


def test_functional_weight_shapes_are_checked() -> None:
    layer = ForegroundPrototypeAttention(4)
    params = list(_params(layer))
    params[2] = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"value_weight must have shape \(d, C\) = \(2, 4\), got \(3, 4\)"):
        foreground_prototype_attention(torch.randn(2, 4, 2, 2), None, *params)


# --- kv_stride: keys and values from s x s windows (our deviation for large crops) ------------


@given(
    fpa_cases(),
    st.sampled_from(["self", "partner"]),
    st.integers(2, 4),
)
def test_kv_stride_shape_and_reference_property(
    case: tuple[int, int, int, int, torch.dtype], values: str, stride: int
) -> None:
    b, c, h, w, dtype = case
    layer = ForegroundPrototypeAttention(c, values=values, kv_stride=stride).to(dtype)
    x = torch.randn(b, c, h, w, dtype=dtype)
    out = layer(x)
    assert out.shape == (b, c, h, w) and out.dtype == dtype
    assert torch.isfinite(out).all()
    ref = _dense(layer.double(), x.double(), None)
    torch.testing.assert_close(out.double(), ref, **TOLERANCES[dtype])


@pytest.mark.parametrize("values", ["self", "partner"])
@pytest.mark.parametrize("pairing", ["halves", "self", "explicit"])
def test_kv_stride_gradcheck(values: str, pairing: str) -> None:
    layer = ForegroundPrototypeAttention(6, key_channels=4, values=values, kv_stride=2).double()
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)  # odd sizes: partial windows
    partner = torch.randn(2, 6, 3, 5, dtype=torch.float64, requires_grad=True)

    def fn(x: torch.Tensor, partner: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        other = {"halves": None, "self": x, "explicit": partner}[pairing]
        return foreground_prototype_attention(x, other, *params, values=values, kv_stride=2)

    params = tuple(p.detach().requires_grad_() for p in _params(layer))
    assert torch.autograd.gradcheck(fn, (x, partner, *params))


@pytest.mark.parametrize("values", ["self", "partner"])
@pytest.mark.parametrize("stride", [2, 3])
def test_kv_stride_equals_dense_in_value_and_gradient(values: str, stride: int) -> None:
    layer = ForegroundPrototypeAttention(16, values=values, kv_stride=stride)
    x = torch.randn(4, 16, 7, 9, requires_grad=True)
    inputs = [x, *layer.parameters()]
    upstream = torch.randn(4, 16, 7, 9)
    grads = torch.autograd.grad(layer(x), inputs, upstream)
    ref_grads = torch.autograd.grad(_dense(layer, x, None), inputs, upstream)
    torch.testing.assert_close(layer(x), _dense(layer, x, None), **TOLERANCES[torch.float32])
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOLERANCES[torch.float32])


def test_kv_stride_partner_values_of_other_size() -> None:
    layer = ForegroundPrototypeAttention(5, values="partner", kv_stride=2).double()
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    partner = torch.randn(2, 5, 7, 3, dtype=torch.float64)
    torch.testing.assert_close(layer(x, partner), _dense(layer, x, partner))


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


def test_kv_stride_one_by_one_map_and_empty_batch() -> None:
    layer = ForegroundPrototypeAttention(4, kv_stride=2)
    x = torch.randn(2, 4, 1, 1)
    torch.testing.assert_close(layer(x), _dense(layer, x, None))
    assert layer(torch.randn(0, 4, 3, 3)).shape == (0, 4, 3, 3)


def test_kv_stride_in_extra_repr_and_type_checked() -> None:
    assert "kv_stride=2" in repr(ForegroundPrototypeAttention(4, kv_stride=2))
    assert "kv_stride" not in repr(ForegroundPrototypeAttention(4))
    with pytest.raises(TypeError, match="kv_stride must be an int, got float"):
        ForegroundPrototypeAttention(4, kv_stride=2.0)  # type: ignore[arg-type]


@pytest.mark.slow
@pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
def test_kv_stride_compiled_equals_eager() -> None:
    layer = ForegroundPrototypeAttention(8, kv_stride=2)
    compiled = torch.compile(layer, fullgraph=True)
    x = torch.randn(4, 8, 5, 7, requires_grad=True)
    eager_out = layer(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [x, *layer.parameters()])
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
