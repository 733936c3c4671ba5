"""Fused FPA token projection with a hand-written, recomputing backward.

Forward, per image with F of shape (C, N):

    A  = softmax_N(F)                  spatial weights, Eq. 1        (C, N)
    P  = A F^T                         channel prototypes, Eq. 2     (C, C)
    Pn = P / max(|P_c|, eps)           row-normalised prototypes     (C, C)
    Fn = F / max(|F_n|, eps)           pixel-normalised features     (C, N)
    T  = Fn^T (W Pn)^T + bias          = L(Phi) with Phi = Pn Fn      (N, K)

Autograd would keep A and Fn alive from the forward to the backward, two extra copies of the
feature map each. Here only F (the caller's tensor), the per-channel log-sum-exp, the per-pixel
norms and the small (C, C) and (K, C) matrices are saved; A and Fn are recomputed in backward.
This is the difference between ~3 and ~5 feature-map copies of peak memory in FPA.
"""

from __future__ import annotations

from typing import Any, overload

import torch
from torch import Tensor

from cscpa_layers._checks import autocast_dtype, without_autocast


def _normalize_backward(grad: Tensor, value: Tensor, norm: Tensor, eps: float, dim: int) -> Tensor:
    """Gradient of ``value / norm.clamp_min(eps)`` with respect to ``value``.

    ``norm`` is ``|value|`` along ``dim`` (kept as a size-1 axis). Where the norm is clamped
    to eps the denominator is constant, exactly as in ``F.normalize``'s autograd graph.
    """
    scale = norm.clamp_min(eps)
    projection = (grad * value).sum(dim, keepdim=True)  # <dOut, value> per vector
    # d(value / |value|) = dOut / |value| - value <dOut, value> / |value|^3, only where unclamped
    radial = torch.where(norm >= eps, projection / scale**3, 0.0)
    return grad / scale - value * radial


def _prototypes_and_norms(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel log-sum-exp (B, C, 1), prototypes P = softmax_N(x) x^T (B, C, C) and
    pixel norms |x_n| (B, 1, N, unclamped) of x (B, C, N), one image at a time.

    The (C, N) temporaries (the softmax weights, the squares) live in one reused buffer, so no
    temporary of the whole batch's size is made: on CPU each fresh allocation of that size
    costs its page faults again (glibc serves it by mmap), which at (8, 512, 64²) was a
    measurable part of FPA's time.
    """
    b, c, n = x.shape
    lse = x.new_empty(b, c, 1)
    protos = x.new_empty(b, c, c)
    pixel_norm = x.new_empty(b, 1, n)
    buffer = x.new_empty(c, n)
    ones = x.new_ones(1, c)
    for i in range(b):
        xi = x[i]  # (C, N)
        torch.logsumexp(xi, dim=-1, keepdim=True, out=lse[i])  # (C, 1)
        weights = torch.sub(xi, lse[i], out=buffer).exp_()  # softmax over the pixels, (C, N)
        torch.matmul(weights, xi.t(), out=protos[i])
        if x.dtype == torch.float16:  # squares overflow above 256: vector_norm accumulates in float32
            pixel_norm[i] = torch.linalg.vector_norm(xi, dim=0, keepdim=True)
        else:  # a product with ones sums the squares down the channels (a strided sum is slow on CPU)
            torch.matmul(ones, torch.mul(xi, xi, out=buffer), out=pixel_norm[i]).sqrt_()
    return lse, protos, pixel_norm


class PrototypeTokens(torch.autograd.Function):
    """``x (B, C, N) -> key (B, N, K)[, value (B, N, K)]`` from the correlation map of x.

    Keys and values come out as separate contiguous tensors, so their gradients arrive
    separately too; slicing one fused (B, N, 2K) output would cost a zero-filled full-size
    gradient per slice in backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        key_weight: Tensor,
        key_bias: Tensor,
        value_weight: Tensor | None,
        value_bias: Tensor | None,
        eps: float,
    ) -> Tensor | tuple[Tensor, Tensor]:
        lse, protos, pixel_norm = _prototypes_and_norms(x)
        proto_norm = protos.norm(dim=-1, keepdim=True)  # (B, C, 1)
        protos_n = protos / proto_norm.clamp_min(eps)  # (B, C, C)
        scale = pixel_norm.clamp_min(eps).transpose(1, 2)  # (B, N, 1)
        weights = [key_weight] if value_weight is None else [key_weight, value_weight]
        biases = [key_bias] if value_bias is None else [key_bias, value_bias]
        # W Pn per image, each (B, K, C). bmm on the expanded W: torch.matmul(W, Pn) folds the
        # batch into rows and copies a transposed Pn, a strided (B, C, C) pass per weight.
        mixed = [torch.bmm(w.expand(x.shape[0], -1, -1), protos_n) for w in weights]
        # L(Phi) = Fn^T M^T + b = (x^T M^T) / |F_n| + b: the per-pixel scale is applied to the
        # (B, N, K) product, so the normalised copy Fn is never stored.
        # addcdiv writes over its own product: one (B, N, K) allocation per output, not two.
        outs = []
        for m, b in zip(mixed, biases):
            product = torch.bmm(x.transpose(1, 2), m.transpose(1, 2))  # (B, N, K)
            outs.append(torch.addcdiv(b, product, scale, out=product))
        ctx.eps = eps
        ctx.device_type = x.device.type
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x, lse, protos, proto_norm, protos_n, pixel_norm, *weights, *mixed)
        return outs[0] if len(outs) == 1 else (outs[0], outs[1])

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        with without_autocast(ctx.device_type):
            return PrototypeTokens._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads: Tensor | None) -> Any:
        x, lse, protos, proto_norm, protos_n, pixel_norm, *rest = ctx.saved_tensors
        eps = ctx.eps
        count = len(rest) // 2
        inv_scale = pixel_norm.clamp_min(eps).reciprocal().transpose(1, 2)  # (B, N, 1)
        grad_protos_n: Tensor | None = None  # dPn, (B, C, C)
        param_grads: list[Tensor | None] = [None, None, None, None]
        used: list[tuple[Tensor, Tensor]] = []  # (G, M) for each output that got a gradient
        b, c, n = x.shape
        scaled = x.new_empty(n, rest[0].shape[0])  # G / |F_n| of one image, (N, K), reused
        for j, (grad, weight, mix) in enumerate(zip(grads, rest[:count], rest[count:])):
            if grad is None:
                continue
            # dM = G^T Fn^T = (G / |F_n|)^T x^T, (B, K, C), one image at a time so that the scaled
            # copy of G is one image's (a whole-batch temporary costs fresh page faults on CPU)
            grad_mixed = x.new_empty(b, mix.shape[1], c)
            for i in range(b):
                torch.mul(grad[i], inv_scale[i], out=scaled)
                torch.matmul(scaled.t(), x[i].t(), out=grad_mixed[i])
            param_grads[2 * j] = (grad_mixed @ protos_n.transpose(1, 2)).sum(0)  # dW, (K, C)
            param_grads[2 * j + 1] = grad.sum((0, 1))  # (K,)
            # dPn += W^T dM, as a bmm on the expanded W^T (no transposed copy of dM, see forward)
            weight_t = weight.t().expand(b, -1, -1)
            if grad_protos_n is None:
                grad_protos_n = torch.bmm(weight_t, grad_mixed)
            else:
                grad_protos_n.baddbmm_(weight_t, grad_mixed)
            used.append((grad, mix))
        if grad_protos_n is None:  # neither output got a gradient
            grad_protos_n = torch.zeros_like(protos)
        grad_protos = _normalize_backward(grad_protos_n, protos, proto_norm, eps, dim=-1)  # dP, (B, C, C)
        # The softmax backward needs <dA_c, A_c> per channel, with dA = dP x. Since P = A x^T it
        # equals sum_c' dP_cc' P_cc': a (C, C) product instead of a pass over the (C, N) map.
        softmax_dot = (grad_protos * protos).sum(-1, keepdim=True)  # (B, C, 1)
        # 1 / |F_n|^2 where the norm is not clamped (there the denominator is a constant eps)
        radial_scale = torch.where(pixel_norm >= eps, inv_scale.transpose(1, 2).square(), 0.0)  # (B, 1, N)
        inv_pixel = inv_scale.transpose(1, 2)  # 1 / |F_n|, (B, 1, N)

        grad_x = torch.empty_like(x)
        # The (C, N) temporaries are made one image at a time and reused, so the peak stays near
        # one image's worth rather than several copies of the whole batch; gx is written in place.
        weights_a = x.new_empty(x.shape[1:])
        grad_a = x.new_empty(x.shape[1:])
        for i in range(x.shape[0]):
            xi, gx = x[i], grad_x[i]  # (C, N)
            # dFn / |F_n| = M^T G^T / |F_n|, summed over keys and values, then scaled per pixel
            if used:
                torch.matmul(used[0][1][i].t(), used[0][0][i].t(), out=gx)
                for grad, mix in used[1:]:
                    gx.addmm_(mix[i].t(), grad[i].t())
                gx.mul_(inv_pixel[i])
            else:
                gx.zero_()
            # Fn = x / |x_n|: dx = dFn / |x_n| - x <dFn, x> / |x_n|^3 = g - x <g, x> / |x_n|^2
            # (the product g * x goes into the buffer A is about to overwrite: no fresh (C, N) temporary)
            radial = torch.mul(gx, xi, out=weights_a).sum(0, keepdim=True).mul_(radial_scale[i])  # (1, N)
            gx.addcmul_(xi, radial, value=-1.0)
            torch.sub(xi, lse[i], out=weights_a).exp_()  # A recomputed, (C, N)
            # P = A x^T: dx += dP^T A, and dA = dP x
            gx.addmm_(grad_protos[i].t(), weights_a)
            # softmax backward: dx += A * (dA - <dA, A>). An in-place subtraction after the product:
            # addmm with the (C, 1) dot as its start value first copies it out to (C, N).
            torch.mm(grad_protos[i], xi, out=grad_a).sub_(softmax_dot[i])
            gx.addcmul_(weights_a, grad_a)
        return (grad_x, *param_grads, None)


@overload
def prototype_tokens(
    x: Tensor,
    key_weight: Tensor,
    key_bias: Tensor,
    value_weight: None = None,
    value_bias: None = None,
    eps: float = 1e-6,
) -> Tensor: ...


@overload
def prototype_tokens(
    x: Tensor,
    key_weight: Tensor,
    key_bias: Tensor,
    value_weight: Tensor,
    value_bias: Tensor,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor]: ...


def prototype_tokens(
    x: Tensor,
    key_weight: Tensor,
    key_bias: Tensor,
    value_weight: Tensor | None = None,
    value_bias: Tensor | None = None,
    eps: float = 1e-6,
) -> Tensor | tuple[Tensor, Tensor]:
    """Keys (B, N, K), and values when their weights are given, from x (B, C, N).

    Returns the keys alone without value weights, and the tuple (keys, values) with them (the
    overloads say so to mypy). Computes in the promoted dtype of x and the weights with
    autocast off (under autocast the attention that follows still runs in reduced precision).
    """
    dtype = torch.promote_types(x.dtype, key_weight.dtype)
    params = [p if p is None else p.to(dtype) for p in (key_weight, key_bias, value_weight, value_bias)]
    with without_autocast(x.device.type):
        return PrototypeTokens.apply(x.to(dtype), *params, eps)


class _OutputProjection(torch.autograd.Function):
    """``x + L_o(attended)`` (or ``L_o(attended)``) in x's (B, C, N) layout.

    The backward returns the attention output's gradient as a contiguous (B, N, d) tensor,
    which the fused attention backward needs: autograd's gradient through the transposed
    operand of ``baddbmm`` is a transposed view, which the attention copied first. The
    forward writes the product into its one output (no copy of the start value), and the
    bias gradient is a product with a ones vector (a reduced-precision sum over (B, N) takes a
    float32 copy of the whole gradient on CPU).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor | None, attended: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        b = attended.shape[0]
        weight_b = weight.expand(b, -1, -1)  # (B, C, d)
        if x is None:
            out = torch.bmm(weight_b, attended.transpose(1, 2))  # (B, C, N)
            if bias is not None:
                out.add_(bias[:, None])
        else:
            out = x + bias[:, None] if bias is not None else x.clone()
            out.baddbmm_(weight_b, attended.transpose(1, 2))
        ctx.save_for_backward(attended, weight)
        ctx.has_bias = bias is not None
        ctx.device_type = attended.device.type
        ctx.set_materialize_grads(False)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Any:
        if grad is None:
            return None, None, None, None
        attended, weight = ctx.saved_tensors
        with without_autocast(ctx.device_type):
            b, n = attended.shape[:2]
            grad_x = grad if ctx.needs_input_grad[0] else None
            grad_att = torch.bmm(grad.transpose(1, 2), weight.expand(b, -1, -1)) if ctx.needs_input_grad[1] else None
            # the per-image products are summed over the batch in float32 at least
            acc = torch.promote_types(grad.dtype, torch.float32)
            grad_w = None
            if ctx.needs_input_grad[2]:
                grad_w = torch.bmm(grad, attended).sum(0, dtype=acc).to(grad.dtype)  # (C, d)
            grad_b = None
            if ctx.has_bias and ctx.needs_input_grad[3]:
                # a matrix-vector product: in bfloat16 the (B C, N) @ (N, 1) matmul took ~10x longer
                c = grad.shape[1]
                grad_b = torch.mv(grad.reshape(b * c, n), grad.new_ones(n)).view(b, c).sum(0, dtype=acc).to(grad.dtype)
        return grad_x, grad_att, grad_w, grad_b


def project_out(x: Tensor, attended: Tensor, weight: Tensor, bias: Tensor | None, *, residual: bool) -> Tensor:
    """FPA's output stage: ``x + L_o(attended)`` with ``residual``, else ``L_o(attended)``.

    x: (B, C, H, W); attended: (B, N, d) with N = H * W; weight: (C, d); bias: (C,) or None.
    Returns (B, C, H, W). Under autocast the stage runs in the autocast dtype, as the
    ``baddbmm`` it replaces did; otherwise in the promoted dtype of its inputs.
    """
    b, c, h, w = x.shape
    device_type = x.device.type
    dtype = autocast_dtype(device_type) or torch.promote_types(
        torch.promote_types(x.dtype, attended.dtype), weight.dtype
    )
    start = x.flatten(2).to(dtype) if residual else None
    params = (weight.to(dtype), None if bias is None else bias.to(dtype))
    with without_autocast(device_type):
        out = _OutputProjection.apply(start, attended.to(dtype), *params)
    return out.view(b, c, h, w)
