"""Edge prototype attention (EPA), CSC-PA paper Eqs. 9-10.

EPA adds the edge prototype P_e (the mean of the adaptive edge container's bank) to every
pixel, weighted by a softmax over the pixels of the cosine between P_e and the pixel's feature:
pixels that look like lesion edges are amplified most.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cscpa_layers._checks import (
    check_bool,
    check_features,
    check_floating,
    check_positive,
    check_same_device,
    check_shape,
)
from cscpa_layers._norms import clamped_channel_norm
from cscpa_layers.edge_container import AdaptiveEdgeContainer

__all__ = ["EdgePrototypeAttention", "edge_prototype_attention"]


def _check_hyper(temperature: float, eps: float) -> None:
    check_positive(temperature, "temperature")
    check_positive(eps, "eps")


def edge_prototype_attention(
    x: Tensor,
    prototype: Tensor,
    *,
    temperature: float = 1.0,
    rescale: bool = True,
    gain: Tensor | float = 1.0,
    eps: float = 1e-6,
    residual: bool = True,
) -> Tensor:
    r"""Amplify the pixels that resemble the edge prototype; returns :math:`F + F_e`.

    Implements paper Eqs. 9-10 for each image, with N = H·W pixels:

    .. math::
        \Phi_e[p] = \mathrm{softmax}_p\big(\cos(P_e, F_{:,p}) / T\big), \qquad
        F_e = g\,s\,\Phi_e \otimes P_e,

    so ``F_e[:, p] = g · s · Φ_e[p] · P_e``, with g = ``gain`` (1 in the paper). The softmax
    runs over all N pixels of the image. Its
    weights sum to 1, so they are about 1/N each and F_e nearly vanishes on a large map; with
    ``rescale`` the scale is s = N, which makes the mean weight exactly 1, otherwise s = 1.
    With the temperature T every rescaled weight lies in [e^(-2/T), e^(2/T)], so F_e[:, p] has
    between 0.14 and 7.4 times the norm of P_e at T = 1 (mean 1), and 1/N of that without
    ``rescale``.

    The prototype is cast to x's dtype; the softmax runs in at least float32. Nothing of size
    (B, C, N) is formed besides the output: the cosines come from ``P_e^T F`` and the pixel
    norms.

    Args:
        x: features F of shape (B, C, H, W).
        prototype: the edge prototype P_e of shape (C,), e.g.
            :meth:`AdaptiveEdgeContainer.prototype`.
        temperature: T > 0; below 1 sharpens the weights, above 1 flattens them.
        rescale: multiply the weights by N so that their mean is 1 (recommended).
        gain: g, a float or a 0-d tensor (a learnable gate: gradient flows into it) that
            multiplies F_e; 1 is the paper's form.
        eps: smallest norm in the cosine, so all-zero features or prototypes give 0, not NaN.
        residual: return ``x + F_e`` (True, the paper's form) or the term ``F_e`` alone (False),
            for a fusion that adds several terms to one x, ``x + F_f + F_e``.

    Returns:
        Tensor of shape (B, C, H, W): ``x + F_e``, or ``F_e`` with ``residual=False``.

    Example:
        >>> x = torch.randn(2, 8, 5, 6)
        >>> prototype = torch.randn(8)
        >>> out = edge_prototype_attention(x, prototype)
        >>> out.shape
        torch.Size([2, 8, 5, 6])
        >>> weights = (out - x).norm(dim=1) / prototype.norm()  # (B, H, W)
        >>> torch.allclose(weights.mean(dim=(1, 2)), torch.ones(2))  # rescale: mean weight 1
        True
        >>> f_e = edge_prototype_attention(x, prototype, residual=False)
        >>> torch.allclose(x + f_e, out, atol=1e-6)
        True
    """
    check_features(x, "x")
    b, c, h, w = x.shape
    check_shape(prototype, (c,), "prototype", "(C,) with C of x")
    check_floating(prototype, "prototype")
    check_same_device(x, prototype, "x", "prototype")
    check_bool(rescale, "rescale")
    check_bool(residual, "residual")
    _check_hyper(temperature, eps)
    if isinstance(gain, Tensor):
        check_shape(gain, (), "gain", "() (a 0-d tensor)")
        check_same_device(x, gain, "x", "gain")
    elif not isinstance(gain, (int, float)) or isinstance(gain, bool):
        raise TypeError(f"gain must be a float or a 0-d tensor, got {type(gain).__name__}")
    n = h * w
    feats = x.flatten(2)  # (B, C, N)
    proto = prototype.to(x.dtype)  # (C,)
    # cos(P_e, F_p) = <P_e, F_p> / (|P_e| |F_p|), without a normalised copy of F.
    dots = torch.matmul(proto, feats)  # (B, N)
    norms = clamped_channel_norm(feats, eps) * proto.norm().clamp_min(eps)  # (B, N)
    logits = dots / norms / temperature  # (B, N)
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))  # Eq. 9
    if rescale:
        weights = weights * n  # mean weight 1 over the N pixels
    if isinstance(gain, Tensor) or gain != 1:
        weights = weights * gain
    weights = weights.to(x.dtype)
    if not residual:  # Eq. 10 alone, F_e = Phi_e (x) P_e: (B, 1, N) * (1, C, 1)
        return (weights.unsqueeze(1) * proto.view(1, c, 1)).view(b, c, h, w)
    # Eq. 10, F_e = Phi_e (x) P_e, added to x in one fused call: (B, 1, N) * (1, C, 1)
    return torch.addcmul(feats, weights.unsqueeze(1), proto.view(1, c, 1)).view(b, c, h, w)


class EdgePrototypeAttention(nn.Module):
    r"""Edge prototype attention layer; see :func:`edge_prototype_attention`.

    Owns an :class:`AdaptiveEdgeContainer` (``self.container``) whose bank gives the edge
    prototype. ``forward(x)`` uses the stored bank; ``forward(x, bank)`` uses a bank you pass,
    typically the in-graph one returned by ``self.container.update(...)`` in this training
    step, so that the container's mixer learns from this step's loss.

    Until the container is initialised the stored bank is meaningless, so ``forward(x)``
    returns x exactly; this is a ``torch.where`` on the ``initialized`` buffer, not a Python
    branch, so ``torch.compile(fullgraph=True)`` works in both states. A bank passed
    explicitly is always used. EPA acts the same in training and eval.

    ``forward(x, bank=None, *, residual=True)`` returns ``x + F_e``; with ``residual=False`` it
    returns the term ``F_e`` alone (zeros until the container is initialised), so that a model
    adding FPA and EPA to the same features writes ``x + fpa(x, residual=False) + epa(x,
    residual=False)``.

    **Gate** (a deviation, off by default). With ``gate=True`` the layer returns
    ``x + γ · F_e`` with a learnable scalar γ (``self.gate``) that starts at 0, so switching EPA
    on at the end of pre-training changes nothing at once and training opens it as far as it
    helps. The paper's form adds F_e with weight 1; on BUSI that term was 0.7-10× the size of
    F and arrived all at once when the container was initialised (docs/deviations.md).
    ``gate=False`` is the paper's form. The gate also multiplies the gradient that reaches the
    container's mixer, so the mixer starts learning as γ leaves 0.

    Args:
        channels: C, the channels of the feature map.
        slots: n, the container's bank size (the paper's 256).
        temperature: T of the softmax over pixels.
        rescale: multiply the weights by N so that their mean is 1.
        gate: a learnable scalar γ on F_e, initialised to 0; False (default): γ = 1 fixed,
            the paper's form.
        eps: smallest norm in the cosine.

    Shape:
        - x: (B, C, H, W).
        - bank: (slots, C) or None.
        - output: (B, C, H, W), ``x + F_e``, or ``F_e`` with ``residual=False``.

    Example:
        >>> epa = EdgePrototypeAttention(8, slots=4)
        >>> x = torch.randn(2, 8, 5, 5)
        >>> torch.equal(epa(x), x)  # not initialised yet: identity
        True
        >>> bool(epa(x, residual=False).any())  # ... and no term
        False
        >>> epa.container.initialize(torch.randn(6, 8))
        >>> bank = epa.container.update(torch.randn(6, 8))
        >>> epa(x, bank).shape
        torch.Size([2, 8, 5, 5])
        >>> torch.allclose(x + epa(x, bank, residual=False), epa(x, bank), atol=1e-6)
        True
    """

    def __init__(
        self,
        channels: int,
        *,
        slots: int = 256,
        temperature: float = 1.0,
        rescale: bool = True,
        gate: bool = False,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        check_bool(rescale, "rescale")
        check_bool(gate, "gate")
        _check_hyper(temperature, eps)
        self.gate = nn.Parameter(torch.zeros(())) if gate else None
        self.container = AdaptiveEdgeContainer(channels, slots=slots)
        self.channels = channels
        self.slots = slots
        self.temperature = temperature
        self.rescale = rescale
        self.eps = eps

    def forward(self, x: Tensor, bank: Tensor | None = None, *, residual: bool = True) -> Tensor:
        check_features(x, "x")
        if x.shape[1] != self.channels:
            raise ValueError(
                f"x must have {self.channels} channels (the layer's `channels`), got {x.shape[1]} "
                f"in shape {tuple(x.shape)}"
            )
        out = edge_prototype_attention(
            x,
            self.container.prototype(bank),
            temperature=self.temperature,
            rescale=self.rescale,
            gain=1.0 if self.gate is None else self.gate.to(x.dtype),
            eps=self.eps,
            residual=residual,
        )
        if bank is not None:
            return out
        # before initialisation: x itself, or a zero term
        return torch.where(self.container.initialized, out, x if residual else 0.0)

    def extra_repr(self) -> str:
        return (
            f"channels={self.channels}, slots={self.slots}, temperature={self.temperature}, "
            f"rescale={self.rescale}, gate={self.gate is not None}, eps={self.eps}"
        )
