"""BatchNorm re-estimation (``--precise-bn``): running statistics recomputed over training inputs."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Callable, Iterable

import torch
from torch import nn

from examples.engine.streams import IndexStream, paired_batches

__all__ = ["precise_bn_inputs", "reestimate_bn"]


def precise_bn_inputs(labeled: Any, unlabeled: Any | None, stage1_input: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
                      *, seed: int, tag: str, count: int, batch: int, rank: int, world: int, workers: int,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """``count`` network inputs for :func:`reestimate_bn`: batches of ``labeled`` (and of
    ``unlabeled``, or None for a method that never reads it) drawn by streams that are a function
    of ``seed`` and ``tag`` only, passed through the method's ``stage1_input``, on ``device``."""
    labeled_stream = IndexStream(len(labeled), seed=seed, tag=f"{tag}-labeled")
    unlabeled_stream = None if unlabeled is None else IndexStream(len(unlabeled), seed=seed, tag=f"{tag}-unlabeled")
    batches = paired_batches(labeled, unlabeled, labeled_stream, unlabeled_stream, 0, count, batch, rank=rank,
                             world=world, workers=workers)
    return (stage1_input(l.image, None if u is None else u.image).to(device, non_blocking=True) for l, u in batches)


@torch.no_grad()
def reestimate_bn(model: nn.Module, inputs: Iterable[torch.Tensor], *, autocast: Callable[[], Any] | None = None) -> None:
    """Replace every BatchNorm's running statistics in ``model`` by their plain average over
    ``inputs`` (network inputs, forwarded in training mode with the current weights, with
    dropout off).

    Dropout layers run as they do at evaluation, so the layers after them are measured on the
    inputs evaluation gives them (dropout's training-mode rescaling inflates their variance)
    and the pass draws no random numbers. Training mode normalises with batch statistics, so
    this changes evaluation only, never the training trajectory. It matters for CSC-PA: EPA
    adds a large, nearly constant vector whose size follows the edge bank from one iteration
    to the next, and stage 2 feeds masked images through the same BatchNorms, so the running
    averages can lag the features and evaluation collapse while the network itself is fine
    (docs/results.md). Use inputs like the training batches (the same batch size and mix),
    since the averages are of per-batch statistics.
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
    for dropout in (d for d in model.modules() if isinstance(d, nn.modules.dropout._DropoutNd)):
        dropout.eval()  # as at evaluation; model.train(was_training) below restores it
    try:
        for x in inputs:
            with autocast() if autocast is not None else contextlib.nullcontext():
                model(x)
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.train(was_training)
