"""FPA's two pairing directions from one score matrix, for CPU.

With the batch halves paired, image a (first half) attends to image b (second half) and b to
a, with the shared key projection as queries and keys. The two score matrices are transposes
of each other:

    S = K_a K_b^T / sqrt(d)                    (N, N)
    out_a = softmax_rows(S)    V_row           a's queries over b's pixels
    out_b = softmax_cols(S)^T  V_col           b's queries over a's pixels

(V_row, V_col) = (V_a, V_b) for the paper's ``values="self"`` and (V_b, V_a) for
``values="partner"``. ``scaled_dot_product_attention`` computes S once per direction, 4·N²·d
FLOPs forward and 10·N²·d backward each (the flash backward recomputes S). Computed once for
both, the pair costs 6·N²·d forward and 14·N²·d backward: 20 instead of 28.

Like a flash kernel, S is never held whole: it is made one block of rows at a time, for all
pairs at once. The column softmax runs online over the blocks (a running maximum, sum and
weighted value sum per column, rescaled when the maximum grows). Backward recomputes each
block of S from the saved maxima and sums of rows and columns, so the extra memory is a few
blocks plus the (B, N) statistics, not N².

On CPU the products dominate; the element-wise work (two exponentials per score forward, two
backward) is small against them. Measured at B = 2, 64², d = 256, float32 on a 2-core AMD EPYC,
forward and backward took 0.88-0.92x the time of SDPA's on the same q, k, v. On CUDA the fused
SDPA kernels are not measured against it, so FPA's ``kernel="auto"`` uses this only on CPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from cscpa_layers._checks import without_autocast

# Elements of one (pairs, rows, N) block of S: 2^22 (16 MiB in float32). The products that sum
# over the blocks (the column side's values and gradients) have the block's rows as their inner
# dimension and read and write a whole (P, N, d) total per block, so small blocks are slow:
# measured on a 2-core AMD EPYC, forward+backward took 2.75 s / 2.37 s / 2.38 s at 2^21 / 2^22 /
# 2^23 for B = 8, 64², d = 256, and 3.63 s / 3.17 s / 2.91 s for B = 2, 96². The backward holds
# three such blocks, so 2^22 keeps them at 48 MiB.
BLOCK_ELEMENTS = 1 << 22


def _rows_per_block(pairs: int, n: int) -> int:
    return max(1, min(n, BLOCK_ELEMENTS // max(1, pairs * n)))


class SharedScoreAttention(torch.autograd.Function):
    """``(query (B, N, d), value (B, N, d)) -> attended (B, N, d)`` with the halves paired.

    ``query`` holds the keys too (FPA's key projection is shared by both images). Row i of the
    output is what SDPA gives for ``q = query``, ``k = query.roll(B // 2, 0)`` and ``v = value``
    (``values="self"``) or ``v = value.roll(B // 2, 0)`` (``values="partner"``).

    Products and exponentials run in the tokens' dtype; softmax statistics and the sums over
    blocks in float32 at least, as in SDPA's reduced-precision kernels.
    """

    @staticmethod
    def forward(ctx: Any, query: Tensor, value: Tensor, partner_values: bool) -> Tensor:
        b, n, d = query.shape
        p = b // 2
        acc = torch.promote_types(query.dtype, torch.float32)
        q_a = query[:p]  # (P, N, d)
        keys_t = (query[p:] * _scale(d)).transpose(1, 2)  # (P, d, N), the scale folded into b's keys
        v_row, v_col = (value[p:], value[:p]) if partner_values else (value[:p], value[p:])
        out = query.new_empty(b, n, d)
        row_max = query.new_empty(p, n, dtype=acc)
        row_sum = query.new_empty(p, n, dtype=acc)
        col_max = query.new_full((p, n), float("-inf"), dtype=acc)
        col_sum = query.new_zeros(p, n, dtype=acc)
        col_acc = query.new_zeros(p, n, d, dtype=acc)  # sum_i exp(S_ij - col_max_j) V_col[i], (P, N, d)
        step = _rows_per_block(p, n)
        scores = query.new_empty(p, step, n)  # S rows [r0, r1), (P, rows, N)
        weights = query.new_empty(p, step, n)
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            s = torch.bmm(q_a[:, r0:r1], keys_t, out=scores[:, : r1 - r0])  # (P, rows, N)
            w = weights[:, : r1 - r0]
            # a's direction: the whole row is in this block, an ordinary softmax. The maxima are
            # scores, so exact in the tokens' dtype: the subtraction needs no mixed-dtype pass.
            block_max = s.amax(2, keepdim=True)  # (P, rows, 1)
            torch.sub(s, block_max, out=w).exp_()
            block_sum = w.sum(2, keepdim=True, dtype=acc)
            row_max[:, r0:r1], row_sum[:, r0:r1] = block_max.squeeze(2), block_sum.squeeze(2)
            out[:p, r0:r1] = torch.bmm(w, v_row).div_(block_sum)  # (P, rows, d)
            # b's direction: columns span all blocks, so their softmax is accumulated online
            new_max = torch.maximum(col_max, s.amax(1))  # (P, N)
            # exp(-inf - finite) = 0 rescales the empty start; all-(-inf) columns cannot occur
            rescale = (col_max - new_max).exp_()
            torch.sub(s, new_max.to(s.dtype)[:, None, :], out=w).exp_()
            col_sum.mul_(rescale).add_(w.sum(1, dtype=acc))
            col_acc.mul_(rescale[..., None])
            _accumulate_product(col_acc, w.transpose(1, 2), v_col[:, r0:r1])  # (P, N, d)
            col_max = new_max
        torch.div(col_acc, col_sum[..., None], out=out[p:])
        ctx.partner_values = partner_values
        ctx.device_type = query.device.type
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(query, value, out, row_max, row_sum, col_max, col_sum)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> Any:
        if grad is None:
            return None, None, None
        with without_autocast(ctx.device_type):
            return (*SharedScoreAttention._backward(ctx, grad.contiguous()), None)

    @staticmethod
    def _backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor]:
        query, value, out, row_max, row_sum, col_max, col_sum = ctx.saved_tensors
        b, n, d = query.shape
        p = b // 2
        acc = row_max.dtype
        q_a = query[:p]
        keys = query[p:] * _scale(d)  # (P, N, d)
        rows_first = not ctx.partner_values  # V_row is a's own values under values="self"
        v_row, v_col = (value[:p], value[p:]) if rows_first else (value[p:], value[:p])
        g_a, g_b = grad[:p], grad[p:]  # (P, N, d)
        row_shift, row_factor = _softmax_shift(row_max, row_sum, query.dtype)
        col_shift, col_factor = _softmax_shift(col_max, col_sum, query.dtype)
        row_shift, col_shift = row_shift[..., None], col_shift[:, None]  # (P, N, 1), (P, 1, N)
        row_factor = None if row_factor is None else row_factor[..., None]
        col_factor = None if col_factor is None else col_factor[:, None]
        # softmax backward's <dOut, out> per query, one per direction, (P, N)
        dot_a = (g_a * out[:p]).sum(-1, dtype=acc).to(query.dtype)[..., None]
        dot_b = (g_b * out[p:]).sum(-1, dtype=acc).to(query.dtype)[:, None]
        grad_query = torch.empty_like(query)
        grad_value = torch.empty_like(value)
        grad_v_col = grad_value[p:] if rows_first else grad_value[:p]  # written block by block
        grad_v_row_out = grad_value[:p] if rows_first else grad_value[p:]
        # dK_b and dV_row are sums over the blocks: in place in float32 and float64, else in a
        # float32 buffer copied out at the end
        if acc == query.dtype:
            grad_keys, grad_v_row = grad_query[p:].zero_(), grad_v_row_out.zero_()
        else:
            grad_keys, grad_v_row = (query.new_zeros(p, n, d, dtype=acc) for _ in range(2))
        step = _rows_per_block(p, n)
        buffers = [query.new_empty(p, step, n) for _ in range(3)]
        for r0 in range(0, n, step):
            r1 = min(n, r0 + step)
            s, p_row, p_col = (buf[:, : r1 - r0] for buf in buffers)  # (P, rows, N) each
            torch.bmm(q_a[:, r0:r1], keys.transpose(1, 2), out=s)
            torch.sub(s, row_shift[:, r0:r1], out=p_row).exp_()  # a's weights
            torch.sub(s, col_shift, out=p_col).exp_()  # b's, transposed
            if row_factor is not None and col_factor is not None:
                p_row.mul_(row_factor[:, r0:r1])
                p_col.mul_(col_factor)
            _accumulate_product(grad_v_row, p_row.transpose(1, 2), g_a[:, r0:r1])  # (P, N, d)
            torch.bmm(p_col, g_b, out=grad_v_col[:, r0:r1])  # (P, rows, d)
            # dS = P_row * (dP_row - dot_a) + P_col * (dP_col - dot_b); s is free to reuse
            torch.bmm(g_a[:, r0:r1], v_row.transpose(1, 2), out=s).sub_(dot_a[:, r0:r1])
            p_row.mul_(s)
            torch.bmm(v_col[:, r0:r1], g_b.transpose(1, 2), out=s).sub_(dot_b)
            p_row.addcmul_(p_col, s)  # dS, (P, rows, N)
            torch.bmm(p_row, keys, out=grad_query[:p, r0:r1])  # dK_a = dS (K_b / sqrt(d))
            _accumulate_product(grad_keys, p_row.transpose(1, 2), q_a[:, r0:r1])  # dS^T K_a, unscaled
        torch.mul(grad_keys, _scale(d), out=grad_query[p:])  # in place where they are the same
        if grad_v_row is not grad_v_row_out:
            grad_v_row_out.copy_(grad_v_row)
        return grad_query, grad_value


def _softmax_shift(maxima: Tensor, sums: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor | None]:
    """Softmax weights as ``exp(S - shift) * factor`` in ``dtype``, from a max and a sum of
    ``exp(S - max)`` kept in float32 or float64.

    Where ``dtype`` is theirs the shift is the log-sum-exp and there is no factor. In a
    reduced precision a log-sum-exp would be rounded (an error of exp(2^-8 |lse|)); the max is
    a score, exact in ``dtype``, and 1 / sum only costs a relative rounding.
    """
    if maxima.dtype == dtype:
        return maxima + sums.log(), None
    return maxima.to(dtype), sums.reciprocal().to(dtype)


def _scale(d: int) -> float:
    """SDPA's default score scale, 1 / sqrt(d) (1 for an empty token width)."""
    return d**-0.5 if d > 0 else 1.0


def _accumulate_product(total: Tensor, left: Tensor, right: Tensor) -> None:
    """``total += left @ right`` (batched); ``total`` may be of a wider dtype than the factors."""
    if total.dtype == left.dtype:
        total.baddbmm_(left, right)
    else:  # reduced-precision factors: the product in their dtype, the sum in total's
        total.add_(torch.bmm(left, right))


def shared_score_attention(query: Tensor, value: Tensor, *, partner_values: bool) -> Tensor:
    """Attention of each batch half to the other, from one score matrix per pair.

    query: (B, N, d), the tokens that serve as queries and keys; value: (B, N, d); B even,
    image i of the first half paired with image i of the second. Returns (B, N, d), what
    ``scaled_dot_product_attention(query, query.roll(B // 2, 0), v)`` returns with
    ``v = value.roll(B // 2, 0)`` if ``partner_values`` else ``value``.
    """
    return SharedScoreAttention.apply(query.contiguous(), value.contiguous(), partner_values)
