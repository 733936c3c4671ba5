"""What a trainer checkpoint (``last.pt``) holds, and exact resumption from it.

:class:`CheckpointState` is a part of :class:`~examples.engine.trainer.FoldTrainer`, kept in its
own module: ``state()`` gathers everything a resumed run needs (weights, optimiser, scheduler,
scaler, streams' position, history, the weight averages, every random state), ``save()`` writes
it atomically, ``load()`` checks that the settings match and restores it.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from examples.engine.checkpoint import rng_state, save_atomic, set_rng_state
from examples.engine.config import TrainConfig
from examples.engine.distributed import Distributed, git_sha
from examples.engine.ema import EpochAverage, WeightAverage
from examples.engine.step import Step, StepStats

__all__ = ["CHECKPOINT_VERSION", "RESUME_ABSENT", "RESUME_KEYS", "CheckpointState"]

CHECKPOINT_VERSION = 1
# Settings a --resume must share with the checkpoint it continues.
RESUME_KEYS = ("method", "fpa", "epa", "backbone", "output_stride", "crop", "resize", "epochs", "pretrain_epochs",
               "batch", "fold", "labeled", "seed", "ema")
RESUME_ABSENT = {"ema": 0.0}  # the value of a key that checkpoints from before it was added lack


class CheckpointState:
    """The checkpoint side of a fold's trainer; the attributes are the trainer's."""

    config: TrainConfig
    dist: Distributed
    device: torch.device
    raw_model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    step: Step
    ema: WeightAverage | None
    epoch_average: EpochAverage | None
    iteration: int
    iters_per_epoch: int
    best_val: float
    best_epoch: int
    history: list[dict[str, float]]
    epochs_ended: int
    last_stats: StepStats | None
    git_shas: list[str]
    epoch_totals: dict[str, float]
    epoch_count: int
    last_path: Path

    @property
    def _first_averaged_epoch(self) -> int:
        """--select average: the 0-based index of the first epoch whose end is averaged."""
        return self.config.epochs - min(self.config.average_epochs, self.config.epochs)

    def state(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "config": dataclasses.asdict(self.config),
            "model": self.raw_model.state_dict(),  # includes the edge bank and its flag
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "iteration": self.iteration,
            "epoch": self.iteration // self.iters_per_epoch,
            "best_val": self.best_val,
            "best_epoch": self.best_epoch,
            "history": self.history,
            "epochs_ended": self.epochs_ended,
            "last_stats": None if self.last_stats is None else self.last_stats._asdict(),
            "git_shas": self.git_shas,
            "epoch_totals": self.epoch_totals,
            "epoch_count": self.epoch_count,
            "pretrain_edges": self.step.state_dict().get("pretrain_edges", []),
            "ema": None if self.ema is None else self.ema.state_dict(),
            "epoch_average": None if self.epoch_average is None else self.epoch_average.state_dict(),
            "rng": rng_state(),
            "git_sha": git_sha(),
        }

    def save(self) -> None:
        if self.dist.main:
            save_atomic(self.state(), self.last_path)
        self.dist.barrier()

    def load(self, path: Path) -> None:
        state = torch.load(path, map_location=self.device, weights_only=False)
        saved = state["config"]
        for key in RESUME_KEYS:
            made = saved.get(key, RESUME_ABSENT.get(key))
            if made != getattr(self.config, key):
                raise SystemExit(
                    f"cannot resume from {path}: it was made with {key}={made!r}, this run has "
                    f"{key}={getattr(self.config, key)!r}; use the same settings or another --out"
                )
        self.raw_model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state["scaler"] is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = state["iteration"]
        self.best_val, self.best_epoch = state["best_val"], state["best_epoch"]
        self.history = state["history"]
        # checkpoints from before this field existed were only written after an epoch's end
        self.epochs_ended = state.get("epochs_ended", self.iteration // self.iters_per_epoch)
        self.last_stats = StepStats(**state["last_stats"]) if state.get("last_stats") else None
        self.epoch_totals, self.epoch_count = state.get("epoch_totals", {}), state.get("epoch_count", 0)
        self.git_shas = list(state.get("git_shas", []))
        self.step.load_state_dict(state, self.device)
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if self.epoch_average is not None:
            # the sums must hold exactly the averaged epochs that have ended (another --select or
            # --average-epochs before the stop would leave the wrong ones)
            saved_average = state.get("epoch_average")
            held = 0 if saved_average is None else int(saved_average["count"])
            needed = max(0, self.epochs_ended - self._first_averaged_epoch)
            if held != needed:
                raise SystemExit(f"cannot resume from {path} with --select average --average-epochs "
                                 f"{self.config.average_epochs}: the average needs {needed} ended epoch(s), the "
                                 f"checkpoint holds {held}; resume with the run's own --select and --average-epochs, "
                                 "or use another --out")
            if saved_average is not None:
                self.epoch_average.load_state_dict(saved_average, self.device)
        set_rng_state(state["rng"])
