"""The step classes: what one training iteration of a method does, behind one interface.

A method is a :class:`Step`: :class:`SupOnlyStep` (the supervised baseline) or
:class:`~examples.engine.cscpa_step.CSCPAStep` (method.md §6). Each owns its whole lifecycle,
so that the trainer, the custom-network tutorial and ``diagnose`` never branch on a method
name:

- ``reads_unlabeled``: whether its batches pair a labeled with an unlabeled batch;
- :meth:`Step.stage1_input`: the network input of a stage-1 (and pre-training) step, which is
  also what BatchNorm re-estimation feeds;
- :meth:`Step.run`: one iteration at an epoch, pre-training included;
- :meth:`Step.end_epoch`: what follows an epoch's last iteration (CSC-PA initialises the edge
  container from the edges buffered in the last pre-training epoch);
- :meth:`Step.state_dict` / :meth:`Step.load_state_dict`: that buffer, for exact resumption.

The network can be anything whose forward takes ``(x, *, edge_bank=None)`` and returns an
object with ``logits`` (B, K, H, W), ``low_res_logits`` (B, K, h, w) and ``features``
(B, C, h, w) (:class:`~examples.models.protocol.SegmentationOutputs`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers import AdaptiveEdgeContainer
from cscpa_layers._checks import check_range
from examples.data.samples import IGNORE_INDEX
from examples.engine.config import TrainConfig

__all__ = ["CSCPAOptions", "NonFiniteLossError", "StepStats", "Step", "SupOnlyStep", "finite", "labels_at", "step_classes"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; that stage's optimiser step was not taken.

    In a CSC-PA iteration (`CSCPAStep.train_step`) a non-finite stage-2 loss leaves stage 1's
    step applied (its loss was finite) and puts the edge container's stored bank back as it was
    before this iteration's update; the message says so."""


@dataclass(frozen=True)
class CSCPAOptions:
    """What one iteration does. The ablation switches of paper Table 2 are `pal` and `masking`
    here; FPA and EPA are switched off by building the network without them. The defaults are
    `TrainConfig`'s (``patch_size`` is its value at the paper's 513 crop)."""

    pal: bool = TrainConfig.pal
    masking: bool = TrainConfig.masking
    pal_weight: float = 1.0
    unsup_weight: float = TrainConfig.unsup_weight
    threshold: float = TrainConfig.threshold  # pseudo-label confidence tau
    lesion_threshold: float | None = None  # tau for pixels labelled lesion; None: ``threshold``
    unsup_rampup: int = 0  # stage-2 epochs over which unsup_weight rises linearly; 0: off
    reliability: str = TrainConfig.reliability  # "threshold" (paper) or "entropy" (authors' code, U2PL)
    patch_size: int = TrainConfig.crop // 9
    mask_ratio: float = TrainConfig.mask_ratio
    keep_hard: float = TrainConfig.keep_hard  # k at the start of training, decays as k (1 - t/T)
    edge_samples: int = 256  # n edge candidates drawn per image set

    def __post_init__(self) -> None:
        # fail at start-up, not when stage 2 first asks for pseudo-labels
        if self.unsup_rampup < 0:
            raise ValueError(f"unsup_rampup must be >= 0 (0: off), got {self.unsup_rampup}")
        if self.lesion_threshold is not None:
            check_range(self.lesion_threshold, "lesion_threshold", 0.0, 1.0)
            if self.reliability != "threshold":
                raise ValueError(f"lesion_threshold needs reliability 'threshold', got {self.reliability!r}: the "
                                 "entropy rule keeps pixels by entropy, not by a confidence threshold")

    def unsup_weight_at(self, stage2_epoch: int) -> float:
        """The weight of CE_u and PAL_u in stage 2's epoch ``stage2_epoch`` (0 = its first)."""
        if self.unsup_rampup <= 0:
            return self.unsup_weight
        return self.unsup_weight * min(1.0, (stage2_epoch + 1) / self.unsup_rampup)

    @property
    def pseudo_label_thresholds(self) -> float | tuple[float, float]:
        """``pseudo_labels``'s threshold: tau, or (tau, lesion tau) for background and lesion."""
        return self.threshold if self.lesion_threshold is None else (self.threshold, self.lesion_threshold)

    @classmethod
    def from_config(cls, config: TrainConfig) -> "CSCPAOptions":
        """The options of ``config``'s method: SupOnly has neither PAL nor masking."""
        return cls(
            pal=config.semi_supervised and config.pal, masking=config.semi_supervised and config.masking,
            threshold=config.threshold, lesion_threshold=config.lesion_threshold, unsup_weight=config.unsup_weight,
            reliability=config.reliability, unsup_rampup=config.unsup_rampup,
            patch_size=config.patch_size or max(1, config.crop // 9), mask_ratio=config.mask_ratio,
            keep_hard=config.keep_hard,
        )


class StepStats(NamedTuple):
    """Scalars of one iteration, for logging (all Python floats)."""

    loss: float  # the last stage's total loss
    ce_labeled: float
    pal_labeled: float
    ce_unlabeled: float
    pal_unlabeled: float
    pseudo_valid: float  # fraction of unlabeled pixels whose pseudo-label is used
    masked: float  # fraction of unlabeled pixels masked out
    edge_candidates: int


def labels_at(labels: Tensor, size: tuple[int, ...]) -> Tensor:
    """Nearest-neighbour resize of (B, H, W) labels to ``size`` (h, w); ignore pixels stay ignored."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()


def finite(loss: Tensor, where: str, applied: str = "") -> Tensor:
    """``loss``, or :class:`NonFiniteLossError` before its step when it is NaN or inf."""
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"the {where} loss is {loss.item()}; its step was not taken{applied}")
    return loss


class Step:
    """The interface of a method's iterations, and what every method shares.

    Args:
        model: the network (possibly DDP-wrapped), see the module docstring.
        optimizer: stepped once per stage.
        container: the EPA edge container of the network, or None without EPA.
        options: see `CSCPAOptions`.
        autocast: a zero-argument factory of the autocast context (nullcontext for float32).
        scaler: a `torch.amp.GradScaler` for float16, or None.
        pretrain_epochs: supervised epochs before the method's own iterations.
        epochs: T, all epochs (t / T drives CSC-PA's schedules).
        seed: the run's seed (CSC-PA draws the container's initial bank from it).
    """

    name: ClassVar[str]
    reads_unlabeled: ClassVar[bool]

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        container: AdaptiveEdgeContainer | None,
        options: CSCPAOptions = CSCPAOptions(),
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
        pretrain_epochs: int = 0,
        epochs: int = 1,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.container = container
        self.options = options
        self.autocast = autocast
        self.scaler = scaler
        self.pretrain_epochs = pretrain_epochs
        self.epochs = epochs
        self.seed = seed

    @classmethod
    def from_config(cls, config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    container: AdaptiveEdgeContainer | None, **kwargs: Any) -> "Step":
        """The step of ``config.method`` (see :func:`step_classes`), with ``config``'s options and schedule."""
        steps = step_classes()
        kind = steps.get(config.method)
        if kind is None:
            raise ValueError(f"method must be one of {sorted(steps)}, got {config.method!r}")
        return kind(model, optimizer, container=container, options=CSCPAOptions.from_config(config),
                    pretrain_epochs=config.pretrain_epochs, epochs=config.epochs, seed=config.seed, **kwargs)

    # -- the interface -------------------------------------------------------------------------

    @classmethod
    def stage1_input(cls, x_l: Tensor, x_u: Tensor | None) -> Tensor:
        """The network input of a stage-1 step from a labeled and an unlabeled batch."""
        raise NotImplementedError

    def phase(self, epoch: int) -> str:
        """What ``epoch`` does, for progress bars."""
        raise NotImplementedError

    def run(self, x_l: Tensor, y_l: Tensor, x_u: Tensor | None, *, epoch: int,
            generator: torch.Generator | None = None) -> StepStats:
        """One iteration of epoch ``epoch`` (0-based)."""
        raise NotImplementedError

    def end_epoch(self, epoch: int) -> None:
        """What follows the last iteration of ``epoch``; nothing by default."""

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume this step exactly; empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        """Restore :meth:`state_dict`'s entries, tensors onto ``device``."""

    # -- shared pieces -------------------------------------------------------------------------

    def _step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def supervised_step(self, x_l: Tensor, y_l: Tensor) -> StepStats:
        """SupOnly's iteration: cross-entropy on the labeled images alone, one step."""
        with self.autocast():
            out = self.model(x_l)
        ce = finite(F.cross_entropy(out.logits.float(), y_l, ignore_index=IGNORE_INDEX), "supervised")
        self._step(ce)
        return StepStats(ce.item(), ce.item(), 0.0, 0.0, 0.0, 0.0, 0.0, 0)


class SupOnlyStep(Step):
    """The supervised baseline: the labeled images only, no pre-training phase."""

    name = "suponly"
    reads_unlabeled = False

    @classmethod
    def stage1_input(cls, x_l: Tensor, x_u: Tensor | None) -> Tensor:
        return x_l

    def phase(self, epoch: int) -> str:
        return "suponly"

    def run(self, x_l: Tensor, y_l: Tensor, x_u: Tensor | None, *, epoch: int,
            generator: torch.Generator | None = None) -> StepStats:
        return self.supervised_step(x_l, y_l)


def step_classes() -> dict[str, type[Step]]:
    """Method name -> step class, the names ``--method`` takes."""
    from examples.engine.cscpa_step import CSCPAStep  # imported here: it builds on this module

    return {SupOnlyStep.name: SupOnlyStep, CSCPAStep.name: CSCPAStep}
