"""Training one fold: batch streams, schedule, checkpoints with exact resumption, evaluation.

`FoldTrainer` is what ``python -m examples.train_busi`` runs per fold and method. What one
iteration does is the method's :class:`~examples.engine.step.Step` (SupOnly or CSC-PA, with
its pre-training and the container's initialisation); this module owns everything around it:
the deterministic batch streams, the poly learning rate, per-epoch validation, atomic
checkpoints with exact resumption, and the final test. The network is any module that follows
:mod:`examples.models.protocol`.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from tqdm import tqdm

from examples.data.folders import DataError
from examples.engine.batchnorm import precise_bn_inputs, reestimate_bn
from examples.engine.checkpoint import StopRequest, save_atomic
from examples.engine.config import TrainConfig
from examples.engine.curves import write_history
from examples.engine.distributed import Distributed, autocast_factory, git_sha
from examples.engine.ema import EpochAverage, WeightAverage
from examples.engine.evaluate import Evaluation, evaluate
from examples.engine.results import FoldResult, write_fold_results
from examples.engine.step import NonFiniteLossError, Step, StepStats
from examples.engine.optim import sgd_poly
from examples.engine.streams import IndexStream, mix_seed, paired_batches
from examples.engine.trainer_state import CHECKPOINT_VERSION, CheckpointState
from examples.models.protocol import edge_container

__all__ = ["CHECKPOINT_VERSION", "FoldTrainer"]

# --select average re-estimates the averaged weights' BatchNorm statistics once, over at least this
# many training batches: with 10 batches of 4 phantom crops the same weights scored from 48 to 57 test
# Dice across three draws of the batches, with 50 within 1.3 points (docs/results.md).
AVERAGE_BN_BATCHES = 50


class FoldTrainer(CheckpointState):
    """Holds the state of one fold's run; `run()` trains, resumes, evaluates (the checkpoint's
    contents and resumption are :class:`~examples.engine.trainer_state.CheckpointState`'s)."""

    def __init__(self, config: TrainConfig, data: Any, model: nn.Module, out_dir: Path, device: torch.device) -> None:
        self.config = config
        self.data = data  # has .labeled, .unlabeled, .val, .test (examples.data.folds.FoldData)
        self.out_dir = out_dir
        self.last_path, self.best_path = out_dir / "last.pt", out_dir / "best.pt"
        self.device = device
        self.dist = Distributed(device)
        self.raw_model = model.to(device)
        if config.sync_bn and self.dist.enabled:
            self.raw_model = nn.SyncBatchNorm.convert_sync_batchnorm(self.raw_model)
        self.model: nn.Module = self.raw_model
        if self.dist.enabled:
            ids = [device.index] if device.type == "cuda" else None
            # Stage 1 leaves the edge container's mixer unused, so unused parameters must be allowed.
            self.model = nn.parallel.DistributedDataParallel(self.raw_model, device_ids=ids, find_unused_parameters=True)
        world_batch = config.batch * self.dist.world
        self.iters_per_epoch = config.iters_per_epoch or max(1, math.ceil(len(data.unlabeled) / world_batch))
        self.total_iters = config.epochs * self.iters_per_epoch
        self.optimizer, self.scheduler = sgd_poly(self.raw_model, config, self.total_iters)
        self.scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        self.autocast = autocast_factory(config.amp, device)
        self.container = edge_container(self.raw_model)
        # --ema: validation, the checkpoint choice and the test use an average of the weights
        self.ema = WeightAverage(self.raw_model, config.ema) if config.ema else None
        # --select average: the weights (with --ema, the average's) at the last epochs' ends
        self.epoch_average = EpochAverage() if config.select == "average" else None
        self.step = Step.from_config(config, self.model, self.optimizer, container=self.container,
                                     autocast=self.autocast, scaler=self.scaler)
        self.iteration = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.history: list[dict[str, float]] = []
        self.epochs_ended = 0  # epochs whose end (validation, checkpoint) has run
        self.last_stats: StepStats | None = None
        self.git_shas: list[str] = []  # the code of every session that trained this run, in order
        self.epoch_totals: dict[str, float] = {}  # sums of this epoch's StepStats, for the epoch means
        self.epoch_count = 0
        self.labeled_stream = IndexStream(len(data.labeled), seed=config.seed, tag=f"labeled-{config.fold}")
        self.unlabeled_stream = IndexStream(len(data.unlabeled), seed=config.seed, tag=f"unlabeled-{config.fold}")

    # -- training ------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        cfg, reads = self.config, self.step.reads_unlabeled
        return paired_batches(self.data.labeled, self.data.unlabeled if reads else None, self.labeled_stream,
                              self.unlabeled_stream, self.iteration, (epoch + 1) * self.iters_per_epoch, cfg.batch,
                              rank=self.dist.rank, world=self.dist.world, workers=cfg.workers)

    def _one_step(self, epoch: int, labeled: Any, unlabeled: Any) -> StepStats:
        cfg = self.config
        # Every random draw of a step is a function of (seed, step): resuming is exact.
        torch.manual_seed(mix_seed(cfg.seed, "step", self.iteration, self.dist.rank))
        generator = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, "draws", self.iteration))
        x_l = labeled.image.to(self.device, non_blocking=True)
        y_l = labeled.mask.to(self.device, non_blocking=True)
        x_u = None if unlabeled is None else unlabeled.image.to(self.device, non_blocking=True)
        return self.step.run(x_l, y_l, x_u, epoch=epoch, generator=generator)

    def run(self, *, log: Callable[[str], None] = print) -> FoldResult:
        cfg = self.config
        start_time = time.perf_counter()
        if cfg.resume and self.last_path.exists():
            self.load(self.last_path)
            log(f"resumed from {self.last_path} at iteration {self.iteration} (epoch {self.iteration // self.iters_per_epoch})")
        elif cfg.resume:
            log(f"--resume: no checkpoint at {self.last_path}, starting from scratch")
        sha = git_sha()  # the code this session trains with, read now rather than when results are written
        if not self.git_shas or self.git_shas[-1] != sha:
            self.git_shas.append(sha)
        last_val = self.history[-1]["val_dice"] if self.history else float("nan")
        if self.epochs_ended < self.iteration // self.iters_per_epoch:
            # stopped on an epoch's last iteration, before that epoch's end: do it now, exactly
            # as an uninterrupted run would have (the same stats, draws and validation)
            log(f"finishing epoch {self.epochs_ended + 1}, which the stop interrupted after its last iteration")
            last_val = self._end_epoch(self.epochs_ended, self.last_stats, log)
        with StopRequest() as stop:
            while self.iteration < self.total_iters:
                epoch = self.iteration // self.iters_per_epoch
                bar = tqdm(total=self.iters_per_epoch, initial=self.iteration - epoch * self.iters_per_epoch,
                           desc=f"fold {cfg.fold} {self.step.phase(epoch)} epoch {epoch + 1}/{cfg.epochs}",
                           disable=not self.dist.main, leave=False, dynamic_ncols=True, file=sys.stderr)
                try:
                    for labeled, unlabeled in self._batches(epoch):
                        try:
                            self.last_stats = self._one_step(epoch, labeled, unlabeled)
                            if self.ema is not None:
                                self.ema.update()
                            for key, value in self.last_stats._asdict().items():
                                self.epoch_totals[key] = self.epoch_totals.get(key, 0.0) + float(value)
                            self.epoch_count += 1
                        except NonFiniteLossError as error:
                            bar.close()
                            raise SystemExit(
                                f"stopped: {error} at iteration {self.iteration} (epoch {epoch + 1}). The last good "
                                f"checkpoint is kept at {self.last_path}; lower --lr or try --amp none, then --resume."
                            ) from error
                        self.scheduler.step()
                        self.iteration += 1
                        bar.update(1)
                        bar.set_postfix(loss=f"{self.last_stats.loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                                        val_dice=f"{last_val:.4f}")
                        if self.dist.any(bool(stop) or self.iteration == cfg.stop_after):
                            bar.close()
                            self.save()  # epochs_ended tells a resumed run whether this epoch's end is still due
                            cause = f"signal {stop.signal}" if stop else "--stop-after"
                            raise SystemExit(
                                f"stopped by {cause} at iteration {self.iteration}; state saved to "
                                f"{self.last_path}. Continue with the same command and --resume."
                            )
                        if cfg.save_every and self.iteration % cfg.save_every == 0 and self.iteration % self.iters_per_epoch:
                            self.save()
                except DataError as error:  # a file that fails to decode when its turn comes
                    bar.close()
                    raise SystemExit(
                        f"stopped at iteration {self.iteration} (epoch {epoch + 1}): {error}. Fix or remove the "
                        f"file, then --resume from {self.last_path}; --verify-data checks every file before training."
                    ) from error
                bar.close()
                last_val = self._end_epoch(epoch, self.last_stats, log)
        return self._finish(time.perf_counter() - start_time, log)

    def _end_epoch(self, epoch: int, stats: StepStats | None, log: Callable[[str], None]) -> float:
        """What follows an epoch's last iteration: the step's own end (CSC-PA initialises the
        container at the end of pre-training), BatchNorm re-estimation, validation, checkpoint."""
        cfg = self.config
        self.step.end_epoch(epoch)
        if self.ema is not None:
            self.ema.copy_buffers()  # the container may have been initialised just now
        if cfg.precise_bn:  # of what validation scores (with --ema the average only); every rank runs its share
            inputs = self._bn_inputs(f"precise-bn-{cfg.fold}-{epoch}", cfg.precise_bn, self.dist.rank, self.dist.world)
            reestimate_bn(self.model if self.ema is None else self.ema.average, inputs, autocast=self.autocast)
        if self.epoch_average is not None and epoch >= self._first_averaged_epoch:
            self.epoch_average.add(self.eval_model)
        val = self._validate(epoch, stats, log)
        self.epochs_ended = epoch + 1
        self.save()
        return val

    @property
    def eval_model(self) -> nn.Module:
        """What validation and the test score: the weight average with --ema, else the network."""
        return self.raw_model if self.ema is None else self.ema.average

    def _validate(self, epoch: int, stats: StepStats | None, log: Callable[[str], None]) -> float:
        val_dice = float("nan")
        if self.dist.main:
            has_val = len(self.data.val) > 0  # without a val split (--select last) there is nothing to score
            result = evaluate(self.eval_model, self.data.val, self.device, autocast=self.autocast) if has_val else None
            val_dice = result.dice if result is not None else float("nan")
            record = {"epoch": epoch + 1, "iteration": self.iteration, "val_dice": val_dice,
                      "val_iou": result.iou if result is not None else float("nan")}
            if stats is not None:
                record.update({f"train_{k}": float(v) for k, v in stats._asdict().items()})
            record.update(self._epoch_means())
            self.history.append(record)
            if result is not None and result.dice > self.best_val:
                self.best_val, self.best_epoch = result.dice, epoch + 1
                save_atomic({"config": dataclasses.asdict(self.config), "model": self.eval_model.state_dict(), "epoch": epoch + 1, "val_dice": result.dice}, self.best_path)
            scored = f"val Dice {result.dice:.4f} IoU {result.iou:.4f}" if result is not None else "no val split"
            log(f"fold {self.config.fold} epoch {epoch + 1}/{self.config.epochs}: {scored}"
                + (f", train loss {stats.loss:.4f}" if stats is not None else ""))
        self.epoch_totals, self.epoch_count = {}, 0
        if self.dist.main:
            write_history(self.history, self.out_dir, title=f"{self.config.method} fold {self.config.fold}")
        self.dist.barrier()
        return val_dice

    def _epoch_means(self) -> dict[str, float]:
        return {f"mean_{k}": v / self.epoch_count for k, v in self.epoch_totals.items()} if self.epoch_count else {}

    def _bn_inputs(self, tag: str, count: int, rank: int, world: int) -> Iterator[torch.Tensor]:
        """``count`` training batches for BatchNorm re-estimation, drawn as a function of the seed and ``tag``."""
        cfg = self.config
        return precise_bn_inputs(self.data.labeled, self.data.unlabeled if self.step.reads_unlabeled else None,
                                 self.step.stage1_input, seed=cfg.seed, tag=tag, count=count, batch=cfg.batch,
                                 rank=rank, world=world, workers=cfg.workers, device=self.device)

    def _averaged_model(self, log: Callable[[str], None]) -> nn.Module:
        """--select average: the averaged weights, with BatchNorm statistics re-estimated over
        max(--precise-bn, AVERAGE_BN_BATCHES) training batches (the running averages belong to
        other weights), scored on val when there is one, and saved as average.pt (read like best.pt)."""
        assert self.epoch_average is not None
        cfg = self.config
        model = self.epoch_average.average(self.eval_model)
        inputs = self._bn_inputs(f"average-{cfg.fold}", max(cfg.precise_bn, AVERAGE_BN_BATCHES), rank=0, world=1)
        reestimate_bn(model, inputs, autocast=self.autocast)
        val = float("nan")
        if len(self.data.val) > 0:
            val = evaluate(model, self.data.val, self.device, autocast=self.autocast).dice
            log(f"fold {cfg.fold} {cfg.method}: the average of the last {self.epoch_average.count} epochs' weights, "
                f"val Dice {val:.4f}")
        save_atomic({"config": dataclasses.asdict(cfg), "model": model.state_dict(), "epoch": cfg.epochs,
                     "average_epochs": self.epoch_average.count, "val_dice": val}, self.out_dir / "average.pt")
        return model

    def _finish(self, seconds: float, log: Callable[[str], None]) -> FoldResult:
        cfg = self.config
        selected = self.total_iters // self.iters_per_epoch
        tested = self.eval_model
        if cfg.select == "best" and self.best_path.exists():
            best = torch.load(self.best_path, map_location=self.device, weights_only=False)
            self.raw_model.load_state_dict(best["model"])  # with --ema, best.pt holds the average
            tested, selected = self.raw_model, best["epoch"]
        chosen = f"checkpoint of epoch {selected}, {'best on val' if cfg.select == 'best' else 'the last'}"
        if self.epoch_average is not None and self.dist.main:
            tested = self._averaged_model(log)
            chosen = f"the average of epochs {cfg.epochs - self.epoch_average.count + 1}-{cfg.epochs}"
        test = Evaluation([], float("nan"), float("nan"), float("nan"), float("nan"))
        if self.dist.main:
            test = evaluate(
                tested, self.data.test, self.device, autocast=self.autocast,
                overlays=cfg.overlays, overlay_dir=self.out_dir / "overlays",
            )
            result = FoldResult(cfg.method, cfg.fold, test, selected, self.best_val, self.history, seconds)
            write_fold_results(self.out_dir, cfg, result, git_shas=self.git_shas, device=self.device,
                               world_size=self.dist.world)
            log(f"fold {cfg.fold} {cfg.method}: test Dice {test.dice:.4f} ± {test.dice_std:.4f}, IoU {test.iou:.4f} ± {test.iou_std:.4f} "
                f"({len(test.scores)} images, {chosen})")
        self.dist.barrier()
        return FoldResult(cfg.method, cfg.fold, test, selected, self.best_val, self.history, seconds)
