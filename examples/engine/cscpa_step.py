"""CSC-PA's iterations, independent of the network (method.md §6).

`CSCPAStep` is the :class:`~examples.engine.step.Step` of the full method: pre-training (stage 1
only, edges buffered in its last epoch), the container's initialisation at its end, then per
iteration stage 1 on [labeled, unlabeled], pseudo-labels and confidence masking from f(x^u), the
edge-container update and stage 2 on [labeled, masked]. FPA, EPA and their container live
inside the network; this class only sees the container it is given.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers import (
    ConfidenceMasking,
    PixelAffinityLoss,
    entropy_keep_mask,
    keep_hard_schedule,
    keep_percent_schedule,
    pseudo_labels,
    select_edge_features,
)
from examples.data.samples import IGNORE_INDEX
from examples.engine.step import StepStats, Step, finite, labels_at
from examples.engine.streams import mix_seed
from examples.models.protocol import SegmentationOutputs

__all__ = ["CSCPAStep"]


class CSCPAStep(Step):
    """CSC-PA: supervised pre-training, the container's initialisation, then two-stage iterations.

    The arguments are :class:`~examples.engine.step.Step`'s; ``options`` (PAL, masking, tau,
    the reliability rule) and ``pretrain_epochs`` matter here.
    """

    name = "cscpa"
    reads_unlabeled = True

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, **kwargs: Any) -> None:
        super().__init__(model, optimizer, **kwargs)
        options = self.options
        self.pal = PixelAffinityLoss(threshold=options.threshold, ignore_index=IGNORE_INDEX)
        self.masking = ConfidenceMasking(
            patch_size=options.patch_size, keep_hard=options.keep_hard, mask_ratio=options.mask_ratio
        )
        self.pretrain_edges: list[Tensor] = []  # labeled edge features of the last pre-training epoch

    # -- the lifecycle (see examples.engine.step) ----------------------------------------------

    @classmethod
    def stage1_input(cls, x_l: Tensor, x_u: Tensor | None) -> Tensor:
        if x_u is None:
            raise ValueError("CSC-PA's stage 1 needs an unlabeled batch, got None")
        return torch.cat([x_l, x_u])

    def phase(self, epoch: int) -> str:
        return "pretrain" if epoch < self.pretrain_epochs else "cscpa"

    def run(self, x_l: Tensor, y_l: Tensor, x_u: Tensor | None, *, epoch: int,
            generator: torch.Generator | None = None) -> StepStats:
        if x_u is None:
            raise ValueError("a CSC-PA iteration needs an unlabeled batch, got None")
        if epoch >= self.pretrain_epochs:
            return self.train_step(x_l, y_l, x_u, epoch=epoch, epochs=self.epochs, generator=generator)
        stats, edges = self.pretrain_step(x_l, y_l, x_u, generator=generator)
        if epoch == self.pretrain_epochs - 1 and self.container is not None:
            self.pretrain_edges.append(edges)
            # Keep the most recent rows only: enough to draw the bank from.
            while sum(e.shape[0] for e in self.pretrain_edges) > 16 * self.container.bank.shape[0]:
                self.pretrain_edges.pop(0)
        return stats

    def end_epoch(self, epoch: int) -> None:
        """At the end of pre-training, the container's bank is drawn from the buffered edges."""
        if epoch != self.pretrain_epochs - 1 or self.container is None or not self.pretrain_edges:
            return
        candidates = torch.cat(self.pretrain_edges)
        generator = torch.Generator(candidates.device).manual_seed(mix_seed(self.seed, "bank-init"))
        self.container.initialize(candidates, generator=generator)
        self.pretrain_edges = []

    def state_dict(self) -> dict[str, Any]:
        return {"pretrain_edges": [e.cpu() for e in self.pretrain_edges]}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.pretrain_edges = [e.to(device) for e in state["pretrain_edges"]]

    # -- pieces ----------------------------------------------------------------------------

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
        loss = finite(ce + self.options.pal_weight * pal, "pre-training")
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
        self._step(finite(ce1 + options.pal_weight * pal1, "stage-1"))

        # Targets for the unlabeled half come from f(x^u), detached.
        with torch.no_grad():
            logits_u = out1.logits[n:].detach().float()
            low_logits_u = out1.low_res_logits[n:].detach().float()
            target_features = out1.features[n:].detach().float()
            full = pseudo_labels(logits_u, threshold=options.pseudo_label_thresholds)
            low = pseudo_labels(low_logits_u, threshold=options.pseudo_label_thresholds)
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
        # the ramp counts stage-2 epochs: int(epoch) - pretrain_epochs is 0 in the first one
        unsup_weight = options.unsup_weight_at(max(0, int(epoch) - self.pretrain_epochs))
        loss = ce_l + unsup_weight * ce_u
        pal_u = loss.new_zeros(())
        if options.pal:
            pal_u = self.pal(
                out2.features[n:].float(),
                low.labels,
                confidence=low_valid.float(),
                target_features=target_features,
            )
            loss = loss + options.pal_weight * (pal_l + unsup_weight * pal_u)
        if not torch.isfinite(loss):
            if stored is not None and self.container is not None:  # undo the update; keep stage 1's step
                with torch.no_grad():
                    self.container.bank.copy_(stored[0])
                    self.container.initialized.copy_(stored[1])
            finite(loss, "stage-2", " (stage 1's step of this iteration was applied; the edge bank is as before it)")
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
