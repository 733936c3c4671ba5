"""Averages of a network's weights, for evaluation: an exponential moving average over steps
(``--ema DECAY``) and a uniform average over the last epochs' ends (``--select average``).

The trainer validates, chooses its checkpoint and tests on the average instead of the
weights of the last step. Training itself is unchanged: the average never feeds back into
the steps (it is not a mean teacher; CSC-PA's pseudo-labels still come from the network being
trained). Short runs on few images end wherever the last noisy steps left them, and a
checkpoint chosen on a small val split picks up that noise too; the average of the recent
steps moves much less from one run to the next.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["EpochAverage", "WeightAverage"]


class WeightAverage:
    """Keeps ``average``, a copy of ``model`` whose parameters follow
    ``a <- d * a + (1 - d) * p`` after every :meth:`update`, with ``d = min(decay, (1 + t) / (10 + t))``
    at update ``t`` (so that the first steps, far from where training goes, fade quickly).
    Buffers (BatchNorm statistics, CSC-PA's edge bank and its flag) are copied, not averaged:
    they are states, not weights.

    Args:
        model: the network being trained (not a DDP wrapper: its ``module``).
        decay: the decay ``d`` in (0, 1).
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not isinstance(decay, float) or not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be a float in (0, 1), got {decay!r}")
        self.decay = decay
        self.updates = 0
        self.average = copy.deepcopy(model).eval()
        self.average.requires_grad_(False)
        # Module.load_state_dict copies in place, so these tensors stay the live ones for the run.
        self._params, self._averaged = list(model.parameters()), list(self.average.parameters())
        self._buffers, self._copies = list(model.buffers()), list(self.average.buffers())

    @torch.no_grad()
    def update(self) -> None:
        """Move the average one step towards the model's current weights."""
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        floats = [(a, p) for a, p in zip(self._averaged, self._params) if a.is_floating_point()]
        if floats:
            torch._foreach_lerp_([a for a, _ in floats], [p.detach() for _, p in floats], 1.0 - d)
        for a, p in zip(self._averaged, self._params):
            if not a.is_floating_point():
                a.copy_(p)
        self.copy_buffers()
        self.updates += 1

    @torch.no_grad()
    def copy_buffers(self) -> None:
        """Copy the model's buffers into the average (after every update, and after a change
        outside the steps, such as the edge container's initialisation at the end of pre-training)."""
        for c, b in zip(self._copies, self._buffers):
            c.copy_(b)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "average": self.average.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["decay"] != self.decay:
            raise ValueError(f"the saved average has decay {state['decay']}, this run {self.decay}")
        self.updates = int(state["updates"])
        self.average.load_state_dict(state["average"])


class EpochAverage:
    """The uniform average of a network's parameters at the ends of several epochs, for
    ``--select average`` (stochastic weight averaging, Izmailov et al. 2018, over the last
    epochs of an ordinary schedule).

    The sums are kept in float64, so the average does not depend on how many epochs were
    added before a resume. Only parameters are averaged; buffers (BatchNorm statistics,
    CSC-PA's edge bank and its flag) are those of the network passed to :meth:`average`,
    and the BatchNorm statistics of the averaged weights must be re-estimated before use.
    """

    def __init__(self) -> None:
        self.sums: list[torch.Tensor] = []
        self.count = 0

    @torch.no_grad()
    def add(self, model: nn.Module) -> None:
        """Add ``model``'s current parameters to the sums."""
        params = [p.detach().double() for p in model.parameters()]
        if not self.sums:
            self.sums = [p.clone() for p in params]
        elif len(params) != len(self.sums) or any(p.shape != s.shape for p, s in zip(params, self.sums)):
            raise ValueError("EpochAverage.add: the network's parameters differ from the ones added before")
        else:
            torch._foreach_add_(self.sums, params)
        self.count += 1

    @torch.no_grad()
    def average(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` (eval mode, no gradients) whose parameters are the average."""
        if self.count == 0:
            raise ValueError("EpochAverage.average: nothing was added")
        averaged = copy.deepcopy(model).eval()
        averaged.requires_grad_(False)
        for p, total in zip(averaged.parameters(), self.sums):
            p.copy_((total / self.count).to(p.dtype))
        return averaged

    def state_dict(self) -> dict[str, Any]:
        return {"sums": [s.cpu() for s in self.sums], "count": self.count}

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.sums = [s.to(device) for s in state["sums"]]
        self.count = int(state["count"])
