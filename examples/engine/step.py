"""One CSC-PA training iteration, independent of the network (method.md §6).

`CSCPAStep` holds the per-iteration logic that the BUSI trainer and the custom-network example
share: stage 1 on [labeled, unlabeled], pseudo-labels and confidence masking from f(x^u), the
edge-container update, stage 2 on [labeled, masked], and the supervised-only baseline step.

The network can be anything whose forward takes ``(x, *, edge_bank=None)`` and returns an object
with ``logits`` (B, K, H, W) at the input size, ``low_res_logits`` (B, K, h, w) and ``features``
(B, C, h, w) at the feature size, for example `examples.models.deeplab.SegmentationOutput`. FPA, EPA
and their container live inside the network; this class only sees the container it is given.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers import (
    AdaptiveEdgeContainer,
    ConfidenceMasking,
    PixelAffinityLoss,
    entropy_keep_mask,
    keep_hard_schedule,
    keep_percent_schedule,
    pseudo_labels,
    select_edge_features,
)

IGNORE_INDEX = 255


class SegmentationOutputs(Protocol):
    logits: Tensor
    low_res_logits: Tensor
    features: Tensor


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; that stage's optimiser step was not taken.

    In a CSC-PA iteration (`CSCPAStep.train_step`) a non-finite stage-2 loss leaves stage 1's
    step applied (its loss was finite) and puts the edge container's stored bank back as it was
    before this iteration's update; the message says so."""


@dataclass(frozen=True)
class CSCPAOptions:
    """What one iteration does. The ablation switches of paper Table 2 are `pal` and `masking`
    here; FPA and EPA are switched off by building the network without them."""

    pal: bool = True
    masking: bool = True
    pal_weight: float = 1.0
    unsup_weight: float = 1.0
    threshold: float = 0.8  # pseudo-label confidence tau
    reliability: str = "threshold"  # "threshold" (paper) or "entropy" (authors' code, U2PL)
    patch_size: int = 57
    mask_ratio: float = 0.7
    keep_hard: float = 0.7  # k at the start of training, decays as 0.7 (1 - t/T)
    edge_samples: int = 256  # n edge candidates drawn per image set


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


def _finite(loss: Tensor, where: str, applied: str = "") -> Tensor:
    if not torch.isfinite(loss):
        raise NonFiniteLossError(f"the {where} loss is {loss.item()}; its step was not taken{applied}")
    return loss


class CSCPAStep:
    """Runs pre-training, CSC-PA and SupOnly iterations on a model and its optimiser.

    Args:
        model: the network (possibly DDP-wrapped), see the module docstring.
        optimizer: stepped once per stage.
        container: the EPA edge container of the network, or None without EPA.
        options: see `CSCPAOptions`.
        autocast: a zero-argument factory of the autocast context (nullcontext for float32).
        scaler: a `torch.amp.GradScaler` for float16, or None.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        container: AdaptiveEdgeContainer | None,
        options: CSCPAOptions = CSCPAOptions(),
        autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.container = container
        self.options = options
        self.autocast = autocast
        self.scaler = scaler
        self.pal = PixelAffinityLoss(threshold=options.threshold, ignore_index=IGNORE_INDEX)
        self.masking = ConfidenceMasking(
            patch_size=options.patch_size, keep_hard=options.keep_hard, mask_ratio=options.mask_ratio
        )

    # -- pieces ----------------------------------------------------------------------------

    def _step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    def _labeled_losses(self, out: SegmentationOutputs, labels: Tensor, count: int) -> tuple[Tensor, Tensor]:
        ce = F.cross_entropy(out.logits[:count].float(), labels, ignore_index=IGNORE_INDEX)
        if not self.options.pal:
            return ce, ce.new_zeros(())
        low = labels_at(labels, tuple(out.features.shape[-2:]))
        return ce, self.pal(out.features[:count].float(), low)

    def _edge_candidates(
        self, out: SegmentationOutputs, labels: Tensor, count: int, generator: torch.Generator | None
    ) -> Tensor:
        """Correct labeled edge features and confident unlabeled ones, at feature resolution."""
        features = out.features.detach().float()
        probs = out.low_res_logits.detach().float().softmax(1)
        confidence, prediction = probs.max(1)
        low = labels_at(labels, tuple(features.shape[-2:]))
        num = self.options.edge_samples
        labeled = select_edge_features(
            features[:count], prediction[:count], target=low, num=num, generator=generator
        )
        if features.shape[0] == count:
            return labeled
        unlabeled = select_edge_features(
            features[count:],
            prediction[count:],
            confidence=confidence[count:],
            threshold=self.options.threshold,
            num=num,
            generator=generator,
        )
        return torch.cat([labeled, unlabeled])

    # -- iterations --------------------------------------------------------------------------

    def supervised_step(self, x_l: Tensor, y_l: Tensor) -> StepStats:
        """SupOnly: cross-entropy on the labeled images alone, one step."""
        with self.autocast():
            out = self.model(x_l)
        ce = _finite(F.cross_entropy(out.logits.float(), y_l, ignore_index=IGNORE_INDEX), "supervised")
        self._step(ce)
        return StepStats(ce.item(), ce.item(), 0.0, 0.0, 0.0, 0.0, 0.0, 0)

    def pretrain_step(
        self, x_l: Tensor, y_l: Tensor, x_u: Tensor, *, generator: torch.Generator | None = None
    ) -> tuple[StepStats, Tensor]:
        """Stage 1 only: CE + PAL on the labeled half of [x_l, x_u]; the unlabeled half acts
        through FPA. Also returns correctly predicted labeled edge features (n, C), detached,
        for the container's initialisation at the end of pre-training."""
        n = x_l.shape[0]
        with self.autocast():
            out = self.model(torch.cat([x_l, x_u]))
        ce, pal = self._labeled_losses(out, y_l, n)
        loss = _finite(ce + self.options.pal_weight * pal, "pre-training")
        self._step(loss)
        labeled_edges = self._edge_candidates(_Slice(out, n), y_l, n, generator)
        return StepStats(loss.item(), ce.item(), pal.item(), 0.0, 0.0, 0.0, 0.0, labeled_edges.shape[0]), labeled_edges

    def train_step(
        self,
        x_l: Tensor,
        y_l: Tensor,
        x_u: Tensor,
        *,
        epoch: float,
        epochs: int,
        generator: torch.Generator | None = None,
    ) -> StepStats:
        """One CSC-PA iteration (method.md §6) at ``epoch`` (t, may be fractional) of ``epochs`` (T);
        t / T drives the masking's keep_hard and the entropy rule's keep percentage."""
        n = x_l.shape[0]
        options = self.options

        # Stage 1: forward [x_l, x_u]; L1 = CE_l + PAL_l.
        with self.autocast():
            out1 = self.model(torch.cat([x_l, x_u]))
        ce1, pal1 = self._labeled_losses(out1, y_l, n)
        self._step(_finite(ce1 + options.pal_weight * pal1, "stage-1"))

        # Targets for the unlabeled half come from f(x^u), detached.
        with torch.no_grad():
            logits_u = out1.logits[n:].detach().float()
            low_logits_u = out1.low_res_logits[n:].detach().float()
            target_features = out1.features[n:].detach().float()
            full = pseudo_labels(logits_u, threshold=options.threshold)
            low = pseudo_labels(low_logits_u, threshold=options.threshold)
            if options.reliability == "entropy":
                percent = keep_percent_schedule(epoch, epochs)
                full_valid = entropy_keep_mask(logits_u, keep_percent=percent)
                low_valid = entropy_keep_mask(low_logits_u, keep_percent=percent)
            else:
                full_valid, low_valid = full.valid, low.valid
            targets_u = torch.where(full_valid, full.labels, IGNORE_INDEX)
            if options.masking:
                masked = self.masking(
                    x_u, logits_u.softmax(1), keep_hard=keep_hard_schedule(epoch, epochs, start=options.keep_hard),
                    generator=generator,
                )
                x_m, masked_fraction = masked.images, masked.mask.float().mean().item()
            else:
                x_m, masked_fraction = x_u, 0.0
            candidates = (
                self._edge_candidates(out1, y_l, n, generator) if self.container is not None else None
            )
        del out1

        # The container update stays in the graph, so stage 2's loss trains its mixer.
        bank = None
        stored = None
        if self.container is not None and candidates is not None:
            stored = (self.container.bank.detach().clone(), self.container.initialized.clone())
            bank = self.container.update(candidates, generator=generator)

        # Stage 2: forward [x_l, x_m]; L2 = CE_l + CE_u + PAL_l + PAL_u.
        with self.autocast():
            out2 = self.model(torch.cat([x_l, x_m]), edge_bank=bank)
        ce_l, pal_l = self._labeled_losses(out2, y_l, n)
        ce_u = F.cross_entropy(out2.logits[n:].float(), targets_u, ignore_index=IGNORE_INDEX)
        # With no reliable pixel, CE over zero targets is NaN by definition: use a zero that
        # stays connected to the graph instead.
        ce_u = torch.where(full_valid.any(), ce_u, out2.logits.sum() * 0.0)
        loss = ce_l + options.unsup_weight * ce_u
        pal_u = loss.new_zeros(())
        if options.pal:
            pal_u = self.pal(
                out2.features[n:].float(),
                low.labels,
                confidence=low_valid.float(),
                target_features=target_features,
            )
            loss = loss + options.pal_weight * (pal_l + options.unsup_weight * pal_u)
        if not torch.isfinite(loss):
            if stored is not None and self.container is not None:  # undo the update; keep stage 1's step
                with torch.no_grad():
                    self.container.bank.copy_(stored[0])
                    self.container.initialized.copy_(stored[1])
            _finite(loss, "stage-2", " (stage 1's step of this iteration was applied; the edge bank is as before it)")
        self._step(loss)
        return StepStats(
            loss.item(),
            ce_l.item(),
            pal_l.item(),
            ce_u.item(),
            pal_u.item(),
            full_valid.float().mean().item(),
            masked_fraction,
            0 if candidates is None else candidates.shape[0],
        )


class _Slice:
    """The labeled rows of a model output, for candidate selection after pre-training steps."""

    def __init__(self, out: SegmentationOutputs, count: int) -> None:
        self.logits = out.logits[:count]
        self.low_res_logits = out.low_res_logits[:count]
        self.features = out.features[:count]


def poly_lr(base_lr: float, iteration: int, total: int, power: float = 0.9) -> float:
    """The poly schedule: base_lr · (1 − t/T)^power."""
    return base_lr * math.pow(max(0.0, 1.0 - iteration / max(total, 1)), power)
