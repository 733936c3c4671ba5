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

Like a flash kernel, S is never held whole: it is made one square tile at a time, for all
pairs at once, and both softmaxes run online over the tiles (a running maximum, sum and
weighted value sum per row and per column, rescaled when the maximum grows). Backward
recomputes each tile of S from the saved maxima and sums, so the extra memory is two or three
tiles plus the (B, N) statistics, not N². Tiles rather than blocks of whole rows: with rows
of N = 129² scores a block of useful size is large, and the product that writes it ran at
116 GFLOP/s against 195 for those that read it (2-core AMD EPYC, float32).

On CPU the products dominate; the element-wise work (two exponentials per score forward, two
backward, and the rescaling of the running sums) is small against them. On CUDA the fused
SDPA kernels are not measured against it, so FPA's ``kernel="auto"`` uses this only on CPU.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from cscpa_layers._checks import without_autocast

# Scores in one (P, tile, tile) tile of S, for all P pairs: 2^21 (8 MiB in float32; backward
# holds three tiles), a side of 1448 for one pair, 724 for four. Forward+backward of the
# attention alone on a 2-core AMD EPYC, float32, d = 256, at 2^19 / 2^20 / 2^21 / 2^22 / 2^23:
# 10.9 / 10.5 / 9.9 / 9.4 / 9.1 s for one pair at 129² (rows of S as blocks: 11.4-12.8 s), and
# 2.48 / 2.38 / 2.48 / 2.35 s at 2^20-2^23 for four pairs at 64²; larger products run faster,
# and memory keeps the tiles at this size.
TILE_ELEMENTS = 1 << 21


def _tile(pairs: int, n: int) -> int:
    """The side of a square tile of S for ``pairs`` pairs of ``n`` tokens each."""
    return max(1, min(n, math.isqrt(TILE_ELEMENTS // max(1, pairs))))


class SharedScoreAttention(torch.autograd.Function):
    """``(query (B, N, d), value (B, N, d)) -> attended (B, N, d)`` with the halves paired.

    ``query`` holds the keys too (FPA's key projection is shared by both images). Row i of the
    output is what SDPA gives for ``q = query``, ``k = query.roll(B // 2, 0)`` and ``v = value``
    (``values="self"``) or ``v = value.roll(B // 2, 0)`` (``values="partner"``).

    Products and exponentials run in the tokens' dtype; softmax statistics and the sums over
    tiles in float32 at least, as in SDPA's reduced-precision kernels.
    """

    @staticmethod
    def forward(ctx: Any, query: Tensor, value: Tensor, partner_values: bool) -> Tensor:
        b, n, d = query.shape
        p = b // 2
        acc = torch.promote_types(query.dtype, torch.float32)
        q_a = query[:p]  # (P, N, d)
        keys_t = (query[p:] * _scale(d)).transpose(1, 2)  # (P, d, N), the scale folded into b's keys
        v_row, v_col = _row_col_halves(value, partner_values)
        out = query.new_empty(b, n, d)
        # running softmax statistics of rows (a's queries) and columns (b's), (P, N)
        row_max, col_max = (query.new_full((p, n), float("-inf"), dtype=acc) for _ in range(2))
        row_sum, col_sum = (query.new_zeros(p, n, dtype=acc) for _ in range(2))
        # running sums of exp(S - max) times the values: the columns' over all row tiles,
        # (P, N, d), the rows' only while their row tile runs, (P, tile, d)
        col_acc = query.new_zeros(p, n, d, dtype=acc)
        t = _tile(p, n)
        row_acc = query.new_empty(p, t, d, dtype=acc)
        buffers = [query.new_empty(p, t, t) for _ in range(2)]
        for r0 in range(0, n, t):
            r1 = min(n, r0 + t)
            rows = slice(r0, r1)
            acc_rows = row_acc[:, : r1 - r0].zero_()
            for c0 in range(0, n, t):
                c1 = min(n, c0 + t)
                cols = slice(c0, c1)
                s, w = (buf[:, : r1 - r0, : c1 - c0] for buf in buffers)
                torch.bmm(q_a[:, rows], keys_t[:, :, cols], out=s)  # (P, rows, cols)
                # a's direction along the rows, then b's along the columns, each online
                _online_softmax_step(s, w, 2, row_max[:, rows], row_sum[:, rows], acc_rows, v_row[:, cols])
                _online_softmax_step(s, w, 1, col_max[:, cols], col_sum[:, cols], col_acc[:, cols], v_col[:, rows])
            torch.div(acc_rows, row_sum[:, rows, None], out=out[:p, rows])  # (P, rows, d)
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
        v_row, v_col = _row_col_halves(value, ctx.partner_values)
        g_a, g_b = grad[:p], grad[p:]  # (P, N, d)
        row_shift, row_factor = _softmax_shift(row_max, row_sum, query.dtype)
        col_shift, col_factor = _softmax_shift(col_max, col_sum, query.dtype)
        # softmax backward's <dOut, out> per query, one per direction, (P, N)
        dot_a = (g_a * out[:p]).sum(-1, dtype=acc).to(query.dtype)
        dot_b = (g_b * out[p:]).sum(-1, dtype=acc).to(query.dtype)
        # every gradient is a sum over tiles, kept in float32 at least. dK_a and dV_col sum over
        # the column tiles of one row tile: a (P, tile, d) total per row tile. dK_b (unscaled)
        # and dV_row sum over the row tiles: (P, N, d) totals, the outputs themselves where
        # they are float32 or float64
        grad_query = torch.empty_like(query)
        grad_value = torch.empty_like(value)
        grad_v_row_out, grad_v_col_out = _row_col_halves(grad_value, ctx.partner_values)
        if acc == query.dtype:
            grad_k_b, grad_v_row = grad_query[p:].zero_(), grad_v_row_out.zero_()
        else:
            grad_k_b, grad_v_row = (query.new_zeros(p, n, d, dtype=acc) for _ in range(2))
        t = _tile(p, n)
        tile_totals = [query.new_empty(p, t, d, dtype=acc) for _ in range(2)]
        buffers = [query.new_empty(p, t, t) for _ in range(3)]
        for r0 in range(0, n, t):
            r1 = min(n, r0 + t)
            rows = slice(r0, r1)
            grad_k_a, grad_v_col = (total[:, : r1 - r0].zero_() for total in tile_totals)  # (P, rows, d)
            for c0 in range(0, n, t):
                c1 = min(n, c0 + t)
                cols = slice(c0, c1)
                s, p_row, p_col = (buf[:, : r1 - r0, : c1 - c0] for buf in buffers)  # (P, rows, cols)
                torch.bmm(q_a[:, rows], keys[:, cols].transpose(1, 2), out=s)
                torch.sub(s, row_shift[:, rows, None], out=p_row).exp_()  # a's attention weights
                torch.sub(s, col_shift[:, None, cols], out=p_col).exp_()  # b's, transposed
                if row_factor is not None and col_factor is not None:
                    p_row.mul_(row_factor[:, rows, None])
                    p_col.mul_(col_factor[:, None, cols])
                _accumulate_product(grad_v_row[:, cols], p_row.transpose(1, 2), g_a[:, rows])
                _accumulate_product(grad_v_col, p_col, g_b[:, cols])
                # dS = P_row * (dP_row - dot_a) + P_col * (dP_col - dot_b); s is free to reuse
                torch.bmm(g_a[:, rows], v_row[:, cols].transpose(1, 2), out=s).sub_(dot_a[:, rows, None])
                p_row.mul_(s)
                torch.bmm(v_col[:, rows], g_b[:, cols].transpose(1, 2), out=s).sub_(dot_b[:, None, cols])
                p_row.addcmul_(p_col, s)  # dS, (P, rows, cols)
                _accumulate_product(grad_k_a, p_row, keys[:, cols])  # dS (K_b / sqrt(d))
                _accumulate_product(grad_k_b[:, cols], p_row.transpose(1, 2), q_a[:, rows])  # dS^T K_a
            grad_query[:p, rows].copy_(grad_k_a)
            grad_v_col_out[:, rows].copy_(grad_v_col)
        torch.mul(grad_k_b, _scale(d), out=grad_query[p:])  # in place where they are the same
        if grad_v_row is not grad_v_row_out:
            grad_v_row_out.copy_(grad_v_row)
        return grad_query, grad_value


def _row_col_halves(value: Tensor, partner_values: bool) -> tuple[Tensor, Tensor]:
    """(V_row, V_col) of a (B, N, d) tensor: the halves that a's and b's queries weight.

    a's queries (the rows of S) weight a's own values under ``values="self"`` and b's under
    ``"partner"``; b's queries (the columns) the other half. The same split serves the values'
    gradient.
    """
    p = value.shape[0] // 2
    return (value[p:], value[:p]) if partner_values else (value[:p], value[p:])


def _online_softmax_step(
    scores: Tensor, weights: Tensor, dim: int, maxima: Tensor, sums: Tensor, total: Tensor, values: Tensor
) -> None:
    """Fold one tile into a running softmax along ``dim`` of ``scores`` (P, rows, cols).

    ``maxima`` and ``sums`` (P, L) and ``total`` (P, L, d) are the running max, sum of
    ``exp(S - max)`` and sum of ``exp(S - max) @ values`` of the L queries along the other
    axis, updated in place; ``values`` (P, K, d) are the K keys' values along ``dim``.
    ``weights`` is a scratch tile of the scores' shape.
    """
    new_max = torch.maximum(maxima, scores.amax(dim))  # (P, L)
    # exp(-inf - finite) = 0 rescales the empty start; all-(-inf) maxima cannot occur
    rescale = (maxima - new_max).exp_()
    # the maxima are scores, exact in the tokens' dtype: no mixed-dtype pass over the tile
    torch.sub(scores, new_max.to(scores.dtype).unsqueeze(dim), out=weights).exp_()
    sums.mul_(rescale).add_(weights.sum(dim, dtype=sums.dtype))
    total.mul_(rescale[..., None])
    _accumulate_product(total, weights if dim == 2 else weights.transpose(1, 2), values)
    maxima.copy_(new_max)


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
    """``total += left @ right`` (batched, in place); ``total`` may be wider than the factors."""
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
