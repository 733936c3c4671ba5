"""The optimiser and learning-rate schedule of a run: SGD with momentum and the poly decay."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from examples.engine.config import TrainConfig

__all__ = ["param_groups", "sgd_poly"]

POLY_POWER = 0.9  # lr_t = lr (1 - t/T)^0.9, the paper's schedule


def param_groups(model: nn.Module, lr: float, backbone_scale: float) -> list[dict[str, Any]]:
    """One SGD group for ``model.backbone`` at ``lr * backbone_scale``, one for the rest at
    ``lr``; a single group when the scale is 1 or the model has no ``backbone``."""
    backbone = getattr(model, "backbone", None)
    if backbone_scale == 1.0 or not isinstance(backbone, nn.Module):
        return [{"params": list(model.parameters()), "lr": lr}]
    inside = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if id(p) not in inside]
    return [{"params": list(backbone.parameters()), "lr": lr * backbone_scale}, {"params": rest, "lr": lr}]


def sgd_poly(model: nn.Module, config: TrainConfig, total_iters: int
             ) -> tuple[torch.optim.SGD, torch.optim.lr_scheduler.LambdaLR]:
    """SGD over ``model`` with ``config``'s rates, momentum and weight decay, and the poly schedule
    over ``total_iters`` steps (stepped once per iteration)."""
    optimizer = torch.optim.SGD(
        param_groups(model, config.lr, config.backbone_lr), lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: max(0.0, 1.0 - t / total_iters) ** POLY_POWER)
    return optimizer, scheduler
