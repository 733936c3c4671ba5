"""An exponential moving average of a network's weights, for evaluation (``--ema DECAY``).

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

__all__ = ["WeightAverage"]


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
