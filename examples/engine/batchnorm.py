"""BatchNorm re-estimation (``--precise-bn``): running statistics recomputed over training inputs."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn

__all__ = ["reestimate_bn"]


@torch.no_grad()
def reestimate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], *, autocast: Callable[[], Any] | None = None) -> None:
    """Replace every BatchNorm's running statistics in ``model`` by their plain average over
    ``inputs`` (network inputs, forwarded in training mode with the current weights).

    Training mode normalises with batch statistics, so this changes evaluation only, never
    the training trajectory. It matters for CSC-PA: EPA adds a large, nearly constant vector
    whose size follows the edge bank from one iteration to the next, and stage 2 feeds masked
    images through the same BatchNorms, so the running averages can lag the features and
    evaluation collapse while the network itself is fine (docs/results.md). Use inputs like
    the training batches (the same batch size and mix), since the averages are of per-batch
    statistics.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the inputs
    was_training = model.training
    model.train()
    try:
        for x in inputs:
            with autocast() if autocast is not None else contextlib.nullcontext():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
