"""Foreground prototype attention (FPA), CSC-PA paper Eqs. 1-6.

FPA lets each image of a labeled/unlabeled pair attend to the other. Pixels become tokens whose
features are their cosine similarities to C channel prototypes, and a cross attention between
the two images' tokens is added back onto the feature map.

Memory: the N x N attention matrix is never formed (``scaled_dot_product_attention`` picks a
flash or memory-efficient kernel; the shared-score kernel of ``_shared_score_attention`` makes
square tiles), and neither is the (B, C, N) correlation map inside the layer: a linear
projection of it is computed as ``(W @ norm(P)) @ norm(F)``, which costs a (B, 2d, C) matrix
instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers._checks import (
    autocast_dtype,
    check_bool,
    check_features,
    check_option,
    check_positive,
    check_positive_int,
    check_rank,
    check_same_device,
    check_shape,
    without_autocast,
)
from cscpa_layers._prototype_tokens import project_out, prototype_tokens
from cscpa_layers._shared_score_attention import shared_score_attention

__all__ = [
    "ForegroundPrototypeAttention",
    "channel_prototypes",
    "correlation_map",
    "foreground_prototype_attention",
]

VALUES_MODES = ("self", "partner")
EVAL_PAIRINGS = ("identity", "self")
KERNELS = ("auto", "sdpa", "shared")


def channel_prototypes(x: Tensor) -> Tensor:
    r"""Pool one prototype vector per channel with that channel's own spatial softmax.

    Implements paper Eqs. 1-2: :math:`P_c = \sum_p \mathrm{softmax}_p(F_c)\, F_{:,p}`. The
    softmax runs over the N pixels of each channel (as in channel-wise distillation), so row
    c is the feature vector seen through channel c's attention map.

    Args:
        x: features of shape (B, C, H, W).

    Returns:
        Prototypes of shape (B, C, C); ``out[b, c]`` is prototype c, a C-dim vector.

    Example:
        >>> x = torch.randn(2, 8, 5, 7)
        >>> channel_prototypes(x).shape
        torch.Size([2, 8, 8])
    """
    check_features(x, "x")
    feats = x.flatten(2)  # (B, C, N)
    weights = feats.softmax(dim=-1)  # (B, C, N), each row sums to 1 over pixels
    return weights @ feats.transpose(1, 2)  # (B, C, C)


def correlation_map(prototypes: Tensor, x: Tensor, *, eps: float = 1e-6) -> Tensor:
    r"""Cosine similarity between every channel prototype and every pixel (paper Eq. 3).

    :math:`\Phi = \mathrm{norm}(P)\,\mathrm{norm}(F)`, where norm is L2 normalisation with
    ``eps`` as the smallest norm, so all-zero features give 0 rather than NaN.

    Args:
        prototypes: (B, C, C) from :func:`channel_prototypes`.
        x: features of shape (B, C, H, W).
        eps: smallest norm used by the normalisation, > 0.

    Returns:
        The correlation map Phi of shape (B, C, H, W); ``out[b, c, h, w]`` is the cosine
        between prototype c and the pixel at (h, w).

    Example:
        >>> x = torch.randn(2, 8, 5, 7)
        >>> phi = correlation_map(channel_prototypes(x), x)
        >>> phi.shape, bool(phi.abs().max() <= 1 + 1e-6)
        (torch.Size([2, 8, 5, 7]), True)
    """
    check_features(x, "x")
    check_positive(eps, "eps")
    b, c, h, w = x.shape
    check_shape(prototypes, (b, c, c), "prototypes", "(B, C, C)")
    protos = F.normalize(prototypes, dim=-1, eps=eps)  # (B, C, C)
    pixels = F.normalize(x.flatten(2), dim=1, eps=eps)  # (B, C, N)
    return (protos @ pixels).view(b, c, h, w)  # (B, C, N) -> (B, C, H, W)


def foreground_prototype_attention(
    x: Tensor,
    partner: Tensor | None,
    key_weight: Tensor,
    key_bias: Tensor | None,
    value_weight: Tensor,
    value_bias: Tensor | None,
    out_weight: Tensor,
    out_bias: Tensor | None,
    *,
    values: str = "self",
    eps: float = 1e-6,
    kv_stride: int = 1,
    residual: bool = True,
    kernel: str = "auto",
) -> Tensor:
    r"""Cross-image prototype attention; returns :math:`F + F_f` (paper Eqs. 4-6).

    Every pixel is a token whose feature is its row of the correlation map Phi
    (:func:`correlation_map`). With keys :math:`K = L_k(\Phi)` and values
    :math:`V = L_v(\Phi)`, image x attends to its partner p:

    .. math::
        F_f = L_o\big(\mathrm{softmax}(K_x K_p^\top / \sqrt{d})\, V\big)

    where V is :math:`V_x` for ``values="self"`` (the paper's choice) and :math:`V_p` for
    ``values="partner"`` (standard cross attention). The key projection is shared by both
    images. The N x N matrix is never materialised: the attention runs through
    ``scaled_dot_product_attention``'s flash and memory-efficient kernels, or (``kernel``)
    through tiles of one score matrix shared by both directions of a pair.

    Args:
        x: features of shape (B, C, H, W).
        partner: features of shape (B, C, H', W'), image i attends to ``partner[i]``. With
            ``values="self"`` the attention indexes the partner's pixels but reads x's
            values, so (H', W') must equal (H, W). ``None`` pairs the two batch halves
            index-wise (B must be even): image i of the first half with image i of the second,
            and the other way round. Passing ``x`` itself pairs each image with itself.
        key_weight: (d, C) weight of the shared key projection L_k.
        key_bias: (d,) or None.
        value_weight: (d, C) weight of the value projection L_v.
        value_bias: (d,) or None.
        out_weight: (C, d) weight of the output projection L_o back to C channels.
        out_bias: (C,) or None.
        values: ``"self"`` or ``"partner"``, which image supplies the values.
        eps: smallest norm in the cosine normalisations, > 0.
        kv_stride: s; with s > 1 the key and value tokens are averaged over s x s windows of
            their map (a partial window at an odd edge averages the pixels it has) before the
            attention, so every query attends to ceil(H'/s) * ceil(W'/s) tokens: about s²
            times fewer attention FLOPs. Queries and the output keep full resolution. 1 (the
            default) is the paper's exact FPA; s > 1 is our deviation for large crops.
        residual: return ``x + F_f`` (True, the paper's Eq. 6) or the term ``F_f`` alone
            (False), for a fusion that adds several terms to one x, ``x + F_f + F_e``.
        kernel: how the attention is computed; the result is the same up to rounding.
            ``"sdpa"``: ``scaled_dot_product_attention``, one call for both directions.
            ``"shared"``: with the batch halves paired (``partner=None``) and
            ``kv_stride=1``, the two directions of a pair share one score matrix, since
            :math:`K_u K_l^\top = (K_l K_u^\top)^\top`: 20 instead of 28 N²·d FLOPs for
            forward and backward, S made one tile at a time (never N x N); measured
            faster on CPU, not measured on CUDA. ``"auto"`` (default): ``"shared"`` on CPU
            in float32, float64 and bfloat16 where it applies, else ``"sdpa"``.

    Returns:
        Tensor of shape (B, C, H, W): ``x + F_f``, or ``F_f`` with ``residual=False``.

    Example:
        >>> fpa = ForegroundPrototypeAttention(8)
        >>> x = torch.randn(4, 8, 6, 5)
        >>> params = (fpa.key.weight, fpa.key.bias, fpa.value.weight, fpa.value.bias,
        ...           fpa.out.weight, fpa.out.bias)
        >>> out = foreground_prototype_attention(x, None, *params)
        >>> out.shape
        torch.Size([4, 8, 6, 5])
        >>> f_f = foreground_prototype_attention(x, None, *params, residual=False)
        >>> torch.allclose(x + f_f, out, atol=1e-6)
        True
    """
    check_features(x, "x")
    check_option(values, "values", VALUES_MODES)
    check_positive(eps, "eps")  # eps = 0 would divide all-zero features by 0
    check_positive_int(kv_stride, "kv_stride")
    check_bool(residual, "residual")
    check_option(kernel, "kernel", KERNELS)
    b, c, h, w = x.shape
    check_rank(key_weight, 2, "key_weight", "(d, C)")
    d = key_weight.shape[0]
    check_shape(key_weight, (d, c), "key_weight", "(d, C)")
    check_shape(value_weight, (d, c), "value_weight", "(d, C)")
    check_shape(out_weight, (c, d), "out_weight", "(C, d)")
    for bias, size, name, layout in (
        (key_bias, d, "key_bias", "(d,)"),
        (value_bias, d, "value_bias", "(d,)"),
        (out_bias, c, "out_bias", "(C,)"),
    ):
        if bias is not None:
            check_shape(bias, (size,), name, layout)
    if partner is None and b % 2 != 0:
        raise ValueError(
            f"pairing the batch halves needs an even batch size, got B={b}; pass partner= "
            "explicitly, or use eval mode with eval_pairing='identity' or 'self'"
        )
    if partner is not None and partner is not x:
        _check_partner(x, partner, values)
    if kernel == "shared" and (partner is not None or kv_stride != 1):
        raise ValueError(
            "kernel='shared' needs the batch halves paired (partner=None) and kv_stride=1, got "
            f"partner={'x itself' if partner is x else 'None' if partner is None else 'a tensor'} and "
            f"kv_stride={kv_stride}; use kernel='auto' or 'sdpa'"
        )
    key_bias = key_weight.new_zeros(d) if key_bias is None else key_bias
    value_bias = value_weight.new_zeros(d) if value_bias is None else value_bias

    # K = L_k(Phi) and V = L_v(Phi) in one fused projection; Phi is never materialised.
    query, value = prototype_tokens(x.flatten(2), key_weight, key_bias, value_weight, value_bias, eps)
    dtype = autocast_dtype(x.device.type) or query.dtype  # the dtype the attention runs in
    if kernel == "shared" or (kernel == "auto" and partner is None and kv_stride == 1 and _shared_pays(query, dtype)):
        with without_autocast(x.device.type):  # in the dtype SDPA would run in under autocast
            # (B, N, d): both directions of each pair from one score matrix
            attended = shared_score_attention(query.to(dtype), value.to(dtype), partner_values=values == "partner")
        return project_out(x, attended, out_weight, out_bias, residual=residual)
    if partner is None:
        # Image i of one half meets image i of the other: a roll by B/2 swaps the halves.
        key = query.roll(b // 2, dims=0)  # (B, N, d)
        if values == "partner":
            value = value.roll(b // 2, dims=0)  # (B, N, d)
    elif partner is x:
        key = query
    elif values == "partner":
        key, value = prototype_tokens(partner.flatten(2), key_weight, key_bias, value_weight, value_bias, eps)
    else:
        key = prototype_tokens(partner.flatten(2), key_weight, key_bias, eps=eps)  # (B, N', d)
    if kv_stride > 1:
        key_size = (h, w) if partner is None or partner is x else partner.shape[2:]
        value_size = (h, w) if values == "self" else key_size
        key = _pool_tokens(key, key_size, kv_stride)  # (B, M, d), M = ceil(H'/s) * ceil(W'/s)
        value = _pool_tokens(value, value_size, kv_stride)

    # One head, (B, 1, N, d): both pairing directions sit in the batch axis, so this is one call.
    attended = F.scaled_dot_product_attention(
        query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    ).squeeze(1)  # (B, N, d)
    return project_out(x, attended, out_weight, out_bias, residual=residual)


def _shared_pays(query: Tensor, dtype: torch.dtype) -> bool:
    """Whether ``kernel="auto"`` shares the scores: on CPU in float32, float64 or bfloat16.

    Those are where it was measured faster than SDPA (docs/benchmarks.md); on CUDA, and in
    float16, it is not measured, so there the fused SDPA kernels stay.
    """
    return query.device.type == "cpu" and dtype in (torch.float32, torch.float64, torch.bfloat16)


def _pool_tokens(tokens: Tensor, size: tuple[int, ...] | torch.Size, stride: int) -> Tensor:
    """Average (B, N, d) tokens of an (H, W) map over stride x stride windows: (B, M, d)."""
    b, _, d = tokens.shape
    h, w = size
    rows, cols = -(-h // stride), -(-w // stride)  # ceil: an odd edge keeps a partial window
    grid = tokens.transpose(1, 2).reshape(b, d, h, w)  # (B, d, H, W)
    # Zero-pad to whole windows, sum each window and divide by the pixels it really holds.
    # (Not avg_pool2d(ceil_mode=True): torch.compile's backward of it is wrong at odd sizes in
    # torch 2.14, which the kv_stride case of FPA's compiled-equals-eager check catches.)
    grid = F.pad(grid, (0, cols * stride - w, 0, rows * stride - h))
    sums = grid.view(b, d, rows, stride, cols, stride).sum((3, 5))  # (B, d, rows, cols)
    heights = (h - torch.arange(rows, device=tokens.device) * stride).clamp(max=stride)
    widths = (w - torch.arange(cols, device=tokens.device) * stride).clamp(max=stride)
    counts = (heights[:, None] * widths[None, :]).to(tokens.dtype)  # (rows, cols)
    # contiguous: the fused attention kernels need a unit stride along d, else SDPA silently
    # falls back to the math kernel, which holds the (N, M) matrix
    return (sums / counts).flatten(2).transpose(1, 2).contiguous()  # (B, M, d), M = rows * cols


def _check_partner(x: Tensor, partner: Tensor, values: str) -> None:
    check_features(partner, "partner")
    check_same_device(x, partner, "x", "partner")
    if partner.dtype != x.dtype:
        raise ValueError(f"partner must have dtype {x.dtype} like x, got {partner.dtype}")
    if partner.shape[:2] != x.shape[:2]:
        raise ValueError(
            f"partner must have the batch size and channels of x, (B, C) = {tuple(x.shape[:2])}, "
            f"got {tuple(partner.shape[:2])}"
        )
    if values == "self" and partner.shape[2:] != x.shape[2:]:
        raise ValueError(
            "with values='self' the attention weights index the partner's pixels but read "
            f"x's values, so partner must have the spatial size of x, (H, W) = {tuple(x.shape[2:])}, "
            f"got {tuple(partner.shape[2:])}; use values='partner' for different sizes"
        )


class ForegroundPrototypeAttention(nn.Module):
    r"""Foreground prototype attention layer; see :func:`foreground_prototype_attention`.

    Holds the key, value and output projections (``C -> d``, ``C -> d``, ``d -> C``, with
    ``d = key_channels``, by default C // 2 as in the authors' 512 -> 256 -> 512). Keys and
    values have the same width so the fused attention kernels apply (flash attention needs
    equal head widths of at most 256).

    In training, ``forward(x)`` pairs the batch halves (labeled first, unlabeled second). In
    eval mode without a partner, ``eval_pairing="identity"`` returns ``x`` unchanged (the
    authors skip FPA at test time) and ``"self"`` pairs each image with itself.

    ``forward(x, partner=None, *, residual=True)`` returns ``x + F_f``; with ``residual=False``
    it returns the term ``F_f`` alone (zeros where FPA is skipped), so that a model adding FPA
    and EPA to the same features writes ``x + fpa(x, residual=False) + epa(x, residual=False)``.

    Args:
        channels: C, the channels of the feature map.
        key_channels: d, the width of keys and values; default ``max(1, channels // 2)``.
        values: ``"self"`` (paper) or ``"partner"`` (standard cross attention).
        eval_pairing: ``"identity"`` or ``"self"``, what eval mode does without a partner.
        eps: smallest norm in the cosine normalisations, > 0.
        kv_stride: keys and values averaged over ``kv_stride`` x ``kv_stride`` windows (about
            kv_stride² times fewer attention FLOPs); 1, the default, is the paper's exact FPA.
        kernel: ``"auto"``, ``"sdpa"`` or ``"shared"``, how the attention is computed (same
            result up to rounding); see :func:`foreground_prototype_attention`. Eval mode's
            ``eval_pairing="self"`` pairs no halves, so it runs SDPA under ``"shared"`` too.

    Shape:
        - x: (B, C, H, W), B even in training unless ``partner`` is given.
        - partner: (B, C, H', W'), with (H', W') = (H, W) under ``values="self"``.
        - output: (B, C, H, W), ``x + F_f``, or ``F_f`` with ``residual=False``.

    Example:
        >>> fpa = ForegroundPrototypeAttention(16)
        >>> x = torch.randn(4, 16, 9, 7)
        >>> fpa(x).shape
        torch.Size([4, 16, 9, 7])
        >>> torch.allclose(x + fpa(x, residual=False), fpa(x), atol=1e-6)
        True
        >>> _ = fpa.eval()
        >>> torch.equal(fpa(x[:1]), x[:1])
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        key_channels: int | None = None,
        values: str = "self",
        eval_pairing: str = "identity",
        eps: float = 1e-6,
        kv_stride: int = 1,
        kernel: str = "auto",
    ) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        key_channels = max(1, channels // 2) if key_channels is None else key_channels
        check_positive_int(key_channels, "key_channels")
        check_option(values, "values", VALUES_MODES)
        check_option(eval_pairing, "eval_pairing", EVAL_PAIRINGS)
        check_positive(eps, "eps")
        check_positive_int(kv_stride, "kv_stride")
        check_option(kernel, "kernel", KERNELS)
        self.channels = channels
        self.key_channels = key_channels
        self.values = values
        self.eval_pairing = eval_pairing
        self.eps = eps
        self.kv_stride = kv_stride
        self.kernel = kernel
        self.key = nn.Linear(channels, key_channels)
        self.value = nn.Linear(channels, key_channels)
        self.out = nn.Linear(key_channels, channels)

    def forward(self, x: Tensor, partner: Tensor | None = None, *, residual: bool = True) -> Tensor:
        check_features(x, "x")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"x must have {self.channels} channels (the layer's `channels`), got {x.shape[1]} "
                f"in shape {tuple(x.shape)}"
            )
        check_bool(residual, "residual")
        kernel = self.kernel
        if partner is None and not self.training:
            if self.eval_pairing == "identity":
                return x if residual else torch.zeros_like(x)  # F_f = 0: FPA is skipped
            partner = x
            # each image with itself is one direction, not a pair: no scores to share
            kernel = "sdpa" if kernel == "shared" else kernel
        return foreground_prototype_attention(
            x,
            partner,
            self.key.weight,
            self.key.bias,
            self.value.weight,
            self.value.bias,
            self.out.weight,
            self.out.bias,
            values=self.values,
            eps=self.eps,
            kv_stride=self.kv_stride,
            residual=residual,
            kernel=kernel,
        )

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, key_channels={self.key_channels}, values={self.values!r}, "
            f"eval_pairing={self.eval_pairing!r}, eps={self.eps}"
            + (f", kv_stride={self.kv_stride}" if self.kv_stride != 1 else "")
            + (f", kernel={self.kernel!r}" if self.kernel != "auto" else "")
        )
