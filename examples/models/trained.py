"""A trained network back from its checkpoint, with the run's config: what predict, export,
diagnose and the study's figures load. None of them imports the trainer's command line."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from examples.engine.checkpoint import read_checkpoint
from examples.engine.config import TrainConfig
from examples.models.deeplab import DeepLabV3Plus

__all__ = ["load_trained", "trained_config"]


def trained_config(state: dict[str, Any]) -> TrainConfig:
    """The config a checkpoint was trained with, as one to rebuild it with: no ImageNet weights
    (the checkpoint holds every weight)."""
    return dataclasses.replace(TrainConfig.from_dict(state["config"]), pretrained=False, weights=None)


def load_trained(path: Path, device: torch.device | str = "cpu") -> tuple[DeepLabV3Plus, TrainConfig]:
    """The network of ``last.pt`` / ``best.pt`` / ``average.pt`` at ``path`` in eval mode on ``device``, and its config.

    Raises:
        SystemExit: the file is missing, unreadable or not a trainer checkpoint.
    """
    state = read_checkpoint(path, device)
    model = DeepLabV3Plus.from_checkpoint(state)
    return model.to(device).eval(), trained_config(state)
