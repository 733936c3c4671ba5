"""Training one fold of CSC-PA or SupOnly: data, schedule, checkpoints, evaluation.

`train_fold` is what `examples/train_busi.py` runs per fold. The per-iteration logic is in
`examples.engine.step.CSCPAStep`; this module owns everything around it: the deterministic
batch streams, the poly learning rate, pre-training and the container's initialisation,
per-epoch validation, atomic checkpoints with exact resumption, and the final test.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from examples.engine.checkpoint import StopRequest, rng_state, save_atomic, set_rng_state
from examples.engine.curves import write_history
from examples.data.folders import DataError
from examples.engine.step import CSCPAOptions, CSCPAStep, NonFiniteLossError, StepStats
from examples.engine.evaluate import Evaluation, evaluate
from examples.data.samples import collate_samples
from examples.engine.streams import IndexStream, SeededItems, StreamBatches, mix_seed

CHECKPOINT_VERSION = 1


@dataclass
class TrainConfig:
    """Everything a run depends on; saved in every checkpoint and results file."""

    method: str = "cscpa"  # "cscpa" or "suponly"
    fpa: bool = True
    epa: bool = True
    pal: bool = True
    masking: bool = True
    data: str = "phantom"
    phantom_images: int = 240
    include_normal: bool = False
    split: str | None = None
    fold: int = 0
    folds: int = 5
    labeled: str = "1/8"
    backbone: str = "resnet50"
    output_stride: int = 8
    pretrained: bool = True
    weights: str | None = None
    crop: int = 513
    resize: int | None = None
    eval_size: int | None = None
    epochs: int = 200
    pretrain_epochs: int = 10
    iters_per_epoch: int | None = None
    batch: int = 4
    lr: float = 0.003
    backbone_lr: float = 1.0  # the encoder's learning rate, as a multiple of lr
    head_channels: int = 256  # width of the classifier's two 3x3 convs (the paper's 256)
    epa_gate: bool = False
    fpa_kv_stride: int = 1  # FPA keys and values from s x s windows; 1 is the paper's exact FPA
    momentum: float = 0.9
    weight_decay: float = 5e-4
    threshold: float = 0.8
    unsup_weight: float = 1.0
    reliability: str = "threshold"
    patch_size: int | None = None
    mask_ratio: float = 0.7
    keep_hard: float = 0.7
    fpa_eval: str = "self"
    select: str = "best"
    precise_bn: int = 0
    seed: int = 0
    device: str = "auto"
    amp: str = "none"
    workers: int = 2
    save_every: int = 50
    overlays: int = 4
    sync_bn: bool = False
    stop_after: int = 0  # stop as a signal would after this iteration (tests of resumption); 0: never
    out: str = "runs/cscpa"
    resume: bool = False

    @property
    def uses_fpa(self) -> bool:
        return self.method == "cscpa" and self.fpa

    @property
    def uses_epa(self) -> bool:
        return self.method == "cscpa" and self.epa


@dataclass
class FoldResult:
    method: str
    fold: int
    test: Evaluation
    selected_epoch: int
    best_val_dice: float
    history: list[dict[str, float]]
    seconds: float


class Distributed:
    """Rank, world size and the collectives the trainer needs; trivial without torchrun.

    ``device`` is where collective tensors live: the process's GPU under NCCL (which refuses
    CPU tensors), the CPU under gloo. Pass the device the process trains on.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.enabled = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if self.enabled else 0
        self.world = dist.get_world_size() if self.enabled else 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def any(self, flag: bool) -> bool:
        """True on every rank when any rank says True (used for stop requests)."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value)
        return bool(value.item() > 0)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def git_sha() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but torch.cuda.is_available() is False")
    return torch.device(name)


def autocast_factory(amp: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager[Any]]:
    if amp == "none":
        return contextlib.nullcontext
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    return lambda: torch.autocast(device.type, dtype=dtype)


def stage1_input(method: str, labeled: Any, unlabeled: Any) -> torch.Tensor:
    """The network input of one stage-1 (and pre-training) step from a labeled and an unlabeled
    batch: ``[labeled, unlabeled]`` for CSC-PA, the labeled images alone for SupOnly."""
    return torch.cat([labeled.image, unlabeled.image]) if method == "cscpa" else labeled.image


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


def _param_groups(model: nn.Module, lr: float, backbone_scale: float) -> list[dict[str, Any]]:
    """One SGD group for ``model.backbone`` at ``lr * backbone_scale``, one for the rest at
    ``lr``; a single group when the scale is 1 or the model has no ``backbone``."""
    backbone = getattr(model, "backbone", None)
    if backbone_scale == 1.0 or not isinstance(backbone, nn.Module):
        return [{"params": list(model.parameters()), "lr": lr}]
    inside = {id(p) for p in backbone.parameters()}
    rest = [p for p in model.parameters() if id(p) not in inside]
    return [{"params": list(backbone.parameters()), "lr": lr * backbone_scale}, {"params": rest, "lr": lr}]


def _loader(dataset: Any, sampler: StreamBatches, workers: int) -> DataLoader[Any]:
    return DataLoader(
        SeededItems(dataset),
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=workers,
        persistent_workers=False,
    )


class FoldTrainer:
    """Holds the state of one fold's run; `run()` trains, resumes, evaluates."""

    def __init__(self, config: TrainConfig, data: Any, model: nn.Module, out_dir: Path, device: torch.device) -> None:
        self.config = config
        self.data = data  # has .labeled, .unlabeled, .val, .test (see examples.train_busi)
        self.out_dir = out_dir
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
        self.optimizer = torch.optim.SGD(
            _param_groups(self.raw_model, config.lr, config.backbone_lr), lr=config.lr, momentum=config.momentum,
            weight_decay=config.weight_decay,
        )
        world_batch = config.batch * self.dist.world
        self.iters_per_epoch = config.iters_per_epoch or max(1, math.ceil(len(data.unlabeled) / world_batch))
        self.total_iters = config.epochs * self.iters_per_epoch
        total = self.total_iters
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda t: max(0.0, 1.0 - t / total) ** 0.9
        )
        self.scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
        self.autocast = autocast_factory(config.amp, device)
        epa = getattr(self.raw_model, "epa", None)
        self.container = epa.container if epa is not None else None
        options = CSCPAOptions(
            pal=config.method == "cscpa" and config.pal,
            masking=config.method == "cscpa" and config.masking,
            threshold=config.threshold,
            unsup_weight=config.unsup_weight,
            reliability=config.reliability,
            patch_size=config.patch_size or max(1, config.crop // 9),
            mask_ratio=config.mask_ratio,
            keep_hard=config.keep_hard,
        )
        self.step_runner = CSCPAStep(
            self.model, self.optimizer, container=self.container, options=options,
            autocast=self.autocast, scaler=self.scaler,
        )
        self.iteration = 0
        self.best_val = -1.0
        self.best_epoch = -1
        self.history: list[dict[str, float]] = []
        self.epochs_ended = 0  # epochs whose end (validation, checkpoint) has run
        self.last_stats: StepStats | None = None
        self.git_shas: list[str] = []  # the code of every session that trained this run, in order
        self.epoch_totals: dict[str, float] = {}  # sums of this epoch's StepStats, for the epoch means
        self.epoch_count = 0
        self.pretrain_edges: list[torch.Tensor] = []
        self.labeled_stream = IndexStream(len(data.labeled), seed=config.seed, tag=f"labeled-{config.fold}")
        self.unlabeled_stream = IndexStream(len(data.unlabeled), seed=config.seed, tag=f"unlabeled-{config.fold}")

    # -- checkpoints -------------------------------------------------------------------------

    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

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
            "pretrain_edges": [e.cpu() for e in self.pretrain_edges],
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
        for key in ("method", "fpa", "epa", "backbone", "output_stride", "crop", "resize", "epochs", "pretrain_epochs", "batch", "fold", "labeled", "seed"):
            if saved.get(key) != getattr(self.config, key):
                raise SystemExit(
                    f"cannot resume from {path}: it was made with {key}={saved.get(key)!r}, this run has "
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
        self.pretrain_edges = [e.to(self.device) for e in state["pretrain_edges"]]
        set_rng_state(state["rng"])

    # -- training ------------------------------------------------------------------------------

    def _batches(self, epoch: int) -> Iterator[tuple[Any, Any]]:
        first, last = self.iteration, (epoch + 1) * self.iters_per_epoch
        cfg, rank, world = self.config, self.dist.rank, self.dist.world
        labeled = _loader(self.data.labeled, StreamBatches(self.labeled_stream, first, last, cfg.batch, rank=rank, world=world), cfg.workers)
        if cfg.method == "suponly":
            for batch in labeled:
                yield batch, None
            return
        unlabeled = _loader(self.data.unlabeled, StreamBatches(self.unlabeled_stream, first, last, cfg.batch, rank=rank, world=world), cfg.workers)
        yield from zip(labeled, unlabeled)

    def _one_step(self, epoch: int, labeled: Any, unlabeled: Any) -> StepStats:
        cfg = self.config
        # Every random draw of a step is a function of (seed, step): resuming is exact.
        torch.manual_seed(mix_seed(cfg.seed, "step", self.iteration, self.dist.rank))
        generator = torch.Generator(self.device).manual_seed(mix_seed(cfg.seed, "draws", self.iteration))
        x_l = labeled.image.to(self.device, non_blocking=True)
        y_l = labeled.mask.to(self.device, non_blocking=True)
        if cfg.method == "suponly":
            return self.step_runner.supervised_step(x_l, y_l)
        x_u = unlabeled.image.to(self.device, non_blocking=True)
        if epoch < cfg.pretrain_epochs:
            stats, edges = self.step_runner.pretrain_step(x_l, y_l, x_u, generator=generator)
            if epoch == cfg.pretrain_epochs - 1 and self.container is not None:
                self.pretrain_edges.append(edges)
                # Keep the most recent rows only: enough to draw the bank from.
                while sum(e.shape[0] for e in self.pretrain_edges) > 16 * self.container.bank.shape[0]:
                    self.pretrain_edges.pop(0)
            return stats
        return self.step_runner.train_step(x_l, y_l, x_u, epoch=epoch, epochs=cfg.epochs, generator=generator)

    def _end_of_pretraining(self) -> None:
        if self.container is None or not self.pretrain_edges:
            return
        generator = torch.Generator(self.device).manual_seed(mix_seed(self.config.seed, "bank-init"))
        candidates = torch.cat(self.pretrain_edges)
        self.container.initialize(candidates, generator=generator)
        self.pretrain_edges = []

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
                phase = "suponly" if cfg.method == "suponly" else ("pretrain" if epoch < cfg.pretrain_epochs else "cscpa")
                bar = tqdm(
                    total=self.iters_per_epoch, initial=self.iteration - epoch * self.iters_per_epoch,
                    desc=f"fold {cfg.fold} {phase} epoch {epoch + 1}/{cfg.epochs}", disable=not self.dist.main,
                    leave=False, dynamic_ncols=True, file=sys.stderr,
                )
                try:
                    for labeled, unlabeled in self._batches(epoch):
                        try:
                            self.last_stats = self._one_step(epoch, labeled, unlabeled)
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
        """What follows an epoch's last iteration: the container's initialisation at the end of
        pre-training, BatchNorm re-estimation, validation, and the checkpoint."""
        cfg = self.config
        if epoch == cfg.pretrain_epochs - 1 and cfg.method == "cscpa":
            self._end_of_pretraining()
        if cfg.precise_bn:
            self._reestimate_bn(epoch)
        val = self._validate(epoch, stats, log)
        self.epochs_ended = epoch + 1
        self.save()
        return val

    def _reestimate_bn(self, epoch: int) -> None:
        """``precise_bn`` batches of the method's own stage-1 input, a function of the seed and
        the epoch, through :func:`reestimate_bn`; every rank runs its share (SyncBatchNorm needs
        all of them)."""
        cfg = self.config
        rank, world = self.dist.rank, self.dist.world

        def stream(part: Any, name: str) -> DataLoader[Any]:
            index = IndexStream(len(part), seed=cfg.seed, tag=f"precise-bn-{cfg.fold}-{epoch}-{name}")
            return _loader(part, StreamBatches(index, 0, cfg.precise_bn, cfg.batch, rank=rank, world=world), cfg.workers)

        labeled = stream(self.data.labeled, "labeled")
        # SupOnly never reads unlabeled images: pair its batches with None instead of loading them.
        unlabeled = stream(self.data.unlabeled, "unlabeled") if cfg.method == "cscpa" else itertools.repeat(None)
        inputs = (stage1_input(cfg.method, l, u).to(self.device, non_blocking=True) for l, u in zip(labeled, unlabeled))
        reestimate_bn(self.model, inputs, autocast=self.autocast)

    def _validate(self, epoch: int, stats: StepStats | None, log: Callable[[str], None]) -> float:
        val_dice = float("nan")
        if self.dist.main:
            has_val = len(self.data.val) > 0  # without a val split (--select last) there is nothing to score
            result = evaluate(self.raw_model, self.data.val, self.device, autocast=self.autocast) if has_val else None
            val_dice = result.dice if result is not None else float("nan")
            record = {"epoch": epoch + 1, "iteration": self.iteration, "val_dice": val_dice,
                      "val_iou": result.iou if result is not None else float("nan")}
            if stats is not None:
                record.update({f"train_{k}": float(v) for k, v in stats._asdict().items()})
            record.update(self._epoch_means())
            self.history.append(record)
            if result is not None and result.dice > self.best_val:
                self.best_val, self.best_epoch = result.dice, epoch + 1
                save_atomic({"config": dataclasses.asdict(self.config), "model": self.raw_model.state_dict(), "epoch": epoch + 1, "val_dice": result.dice}, self.best_path)
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

    def _finish(self, seconds: float, log: Callable[[str], None]) -> FoldResult:
        cfg = self.config
        selected = self.total_iters // self.iters_per_epoch
        if cfg.select == "best" and self.best_path.exists():
            best = torch.load(self.best_path, map_location=self.device, weights_only=False)
            self.raw_model.load_state_dict(best["model"])
            selected = best["epoch"]
        test = Evaluation([], float("nan"), float("nan"), float("nan"), float("nan"))
        if self.dist.main:
            test = evaluate(
                self.raw_model, self.data.test, self.device, autocast=self.autocast,
                overlays=cfg.overlays, overlay_dir=self.out_dir / "overlays",
            )
            self._write_results(test, selected, seconds)
            log(f"fold {cfg.fold} {cfg.method}: test Dice {test.dice:.4f} ± {test.dice_std:.4f}, IoU {test.iou:.4f} ± {test.iou_std:.4f} "
                f"({len(test.scores)} images, checkpoint of epoch {selected}, {cfg.select} on val)")
        self.dist.barrier()
        return FoldResult(cfg.method, cfg.fold, test, selected, self.best_val, self.history, seconds)

    def _write_results(self, test: Evaluation, selected: int, seconds: float) -> None:
        summary = {
            "method": self.config.method,
            "fold": self.config.fold,
            "config": dataclasses.asdict(self.config),
            "git_sha": self.git_shas[-1] if self.git_shas else git_sha(),
            "git_shas": self.git_shas,
            "torch": torch.__version__,
            "device": str(self.device),
            "world_size": self.dist.world,
            "selected_epoch": selected,
            "best_val_dice": self.best_val,
            "test": {"dice": test.dice, "dice_std": test.dice_std, "iou": test.iou, "iou_std": test.iou_std, "images": len(test.scores)},
            "history": self.history,
            "seconds": seconds,
        }
        (self.out_dir / "results.json").write_text(json.dumps(summary, indent=2))
        lines = ["id,dice,iou"] + [f'"{s.id}",{s.dice:.6f},{s.iou:.6f}' for s in test.scores]
        (self.out_dir / "test_scores.csv").write_text("\n".join(lines) + "\n")
