"""What the trainer needs of a network: the protocol a custom model follows to train in it.

`examples.engine.trainer.FoldTrainer` (and so ``python -m examples.train_busi``, its
checkpoints, ``--resume`` and the evaluation) works with any ``nn.Module`` that

1. takes ``(x, *, edge_bank=None)`` with ``x`` of (B, 3, H, W) and returns a
   :class:`SegmentationOutputs` (train and eval mode alike): ``logits`` (B, K, H, W) at the
   input size, ``low_res_logits`` (B, K, h, w) and ``features`` (B, C, h, w) at the feature
   size, where PAL and the edge selection work;
2. optionally has an ``epa`` attribute (an :class:`~cscpa_layers.EdgePrototypeAttention`)
   whose ``container`` the CSC-PA step initialises and updates; ``edge_bank`` is the bank that
   update returns, to be used by that EPA in stage 2;
3. optionally has a ``backbone`` submodule, which ``--backbone-lr`` scales.

A :data:`ModelBuilder` makes such a network from the run's config; pass it as
``examples.engine.run.main(argv, build_model=...)`` (docs/custom-network.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:
    from cscpa_layers import AdaptiveEdgeContainer
    from examples.engine.config import TrainConfig

__all__ = ["ModelBuilder", "SegmentationOutputs", "edge_container"]


class SegmentationOutputs(Protocol):
    """What a network returns: ``logits`` (B, K, H, W), ``low_res_logits`` (B, K, h, w) and
    ``features`` (B, C, h, w)."""

    logits: Tensor
    low_res_logits: Tensor
    features: Tensor


ModelBuilder = Callable[["TrainConfig"], nn.Module]


def edge_container(model: nn.Module) -> "AdaptiveEdgeContainer | None":
    """The edge container of ``model``'s EPA (``model.epa.container``), or None without EPA."""
    epa: Any = getattr(model, "epa", None)
    return epa.container if epa is not None else None
