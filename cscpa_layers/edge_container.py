"""The adaptive edge container of CSC-PA (paper Eqs. 7-8): a learned, persistent edge bank.

The container keeps ``slots`` edge feature vectors (the bank C_h) as a buffer, so checkpoints
save it, and blends each step's freshly drawn edge candidates E_h into it with a linear layer
over the slot axis. Under ``torch.distributed`` every rank ends each call with the same bank.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cscpa_layers._checks import (
    check_floating,
    check_generator,
    check_positive_int,
    check_rank,
    check_same_device,
    check_shape,
    draw_device,
)

__all__ = ["AdaptiveEdgeContainer"]


def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group, or (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_candidates(candidates: Tensor) -> Tensor:
    """Concatenate every rank's (m_r, C) candidates in rank order; counts may differ, even be 0."""
    rank, world = _world()
    if world == 1:
        return candidates
    count = torch.tensor([candidates.shape[0]], dtype=torch.long, device=candidates.device)
    counts = [torch.empty_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    largest = max(sizes)
    if largest == 0:  # every rank agrees on this branch: they all hold the same sizes
        return candidates
    # all_gather needs equal shapes: pad every rank to the largest count, then trim.
    padded = candidates.new_zeros(largest, candidates.shape[1])  # (max m_r, C)
    padded[: candidates.shape[0]] = candidates
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([rows[:size] for rows, size in zip(gathered, sizes)])  # (sum m_r, C)


def _draw(count: int, slots: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``slots`` indices into ``count`` rows: a random permutation, repeated as needed.

    With ``count >= slots`` this is a draw without replacement. With fewer rows it samples with
    replacement, but evenly: every row is used ``slots // count`` or one more times, in fresh
    random permutations, so the bank's mean has less sampling noise than i.i.d. draws give.
    """
    rounds = math.ceil(slots / count)
    # (rounds, count) keys on the generator's device; the chosen indices move to ``device``
    keys = torch.rand(rounds, count, generator=generator, device=draw_device(generator, device))
    return keys.argsort(dim=1).flatten()[:slots].to(device)  # (slots,)


def _shared_draw(count: int, slots: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """:func:`_draw` on rank 0, broadcast, so that every rank picks the same rows."""
    rank, world = _world()
    if world == 1:
        return _draw(count, slots, generator, device)
    index = _draw(count, slots, generator, device) if rank == 0 else torch.empty(slots, dtype=torch.long, device=device)
    dist.broadcast(index, src=0)
    return index


class AdaptiveEdgeContainer(nn.Module):
    r"""A bank of ``slots`` edge features, blended with new candidates by a learned mixer.

    Implements paper Eqs. 7-8. With E_h the (slots, C) edge features drawn at step h and
    C_{h-1} the stored bank,

    .. math::
        C_h = L\big([E_h; C_{h-1}]\big), \qquad P_e = \frac{1}{n} \sum_{i=1}^{n} C_h[i],

    where ``[;]`` concatenates along the slot axis (2n rows) and L is ``mixer``, a
    ``Linear(2n, n)`` acting on that axis. ``mixer`` starts as the blend weight = [½I, ½I],
    bias = 0, so the first update is C_h = ½(E_h + C_{h-1}); PyTorch's default initialisation
    would mix the bank into random signed combinations whose mean points nowhere.

    State, all in ``state_dict``: ``bank`` (slots, C) buffer, ``initialized`` (0-dim bool
    buffer) and the ``mixer`` parameters.

    Gradient: :meth:`update` returns the new bank still in the graph through ``mixer``, so a
    loss on this step's forward trains the mixer. The candidates are detached (the features
    get no gradient through the bank) and so is the stored copy, so the graph never grows
    across steps.

    Candidate counts: :meth:`initialize` and :meth:`update` draw ``slots`` rows; with fewer
    candidates than slots they sample with replacement (every candidate used evenly), so the
    bank's shape never changes. With no candidates at all, :meth:`update` leaves the bank as it
    is and :meth:`initialize` raises. Before :meth:`initialize`, :meth:`update` initialises.

    Distributed: under an initialised ``torch.distributed`` process group, both methods gather
    the candidates of all ranks (counts may differ, even be zero on some ranks), draw the rows
    once on rank 0 with rank 0's generator and broadcast the choice, so every rank applies the
    identical update and holds the identical bank. They are collectives: every rank must call
    them, in the same order. Without a process group they work locally.

    Args:
        channels: C, the width of an edge feature.
        slots: n, the number of features in the bank (the paper's 256).

    Example:
        >>> container = AdaptiveEdgeContainer(8, slots=4)
        >>> container.initialize(torch.randn(10, 8))
        >>> bank = container.update(torch.randn(3, 8))  # in the graph through container.mixer
        >>> bank.shape, container.prototype(bank).shape, bool(container.initialized)
        (torch.Size([4, 8]), torch.Size([8]), True)
    """

    bank: Tensor
    initialized: Tensor

    def __init__(self, channels: int, *, slots: int = 256) -> None:
        super().__init__()
        check_positive_int(channels, "channels")
        check_positive_int(slots, "slots")
        self.channels = channels
        self.slots = slots
        self.mixer = nn.Linear(2 * slots, slots)
        self.register_buffer("bank", torch.zeros(slots, channels))
        self.register_buffer("initialized", torch.tensor(False))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Set the mixer to the blend [½I, ½I] with zero bias (the bank is left alone)."""
        with torch.no_grad():
            eye = torch.eye(self.slots, dtype=self.mixer.weight.dtype, device=self.mixer.weight.device)
            self.mixer.weight.copy_(0.5 * torch.cat([eye, eye], dim=1))  # (n, 2n)
            self.mixer.bias.zero_()

    def _candidates(self, candidates: Tensor) -> Tensor:
        """Validate, detach, cast to the bank's dtype and gather across ranks."""
        check_rank(candidates, 2, "candidates", "(n, C)")
        check_floating(candidates, "candidates")
        if candidates.shape[1] != self.channels:
            raise ValueError(
                f"candidates must have shape (n, C) with C = {self.channels} (the container's "
                f"`channels`), got {tuple(candidates.shape)}"
            )
        check_same_device(self.bank, candidates, "the bank", "candidates")
        return _gather_candidates(candidates.detach().to(self.bank.dtype))

    def _initialize_rows(self, rows: Tensor, generator: torch.Generator | None) -> None:
        """Fill the bank from gathered rows (M > 0, the same on every rank)."""
        index = _shared_draw(rows.shape[0], self.slots, generator, rows.device)  # (n,)
        self._store(rows[index])

    def _store(self, bank: Tensor) -> None:
        with torch.no_grad():
            self.bank.copy_(bank)
            self.initialized.fill_(True)

    def initialize(self, candidates: Tensor, generator: torch.Generator | None = None) -> None:
        """Fill the bank with ``slots`` rows drawn from ``candidates`` (n, C), and mark it ready.

        The paper draws correct labeled edge features at the end of pre-training. With fewer
        candidates than slots the rows repeat (see the class docstring). Raises ``ValueError``
        when there are no candidates on any rank.

        Args:
            candidates: edge features of shape (m, C), e.g. from :func:`select_edge_features`.
            generator: generator of the draw (rank 0's is used under torch.distributed).
        """
        check_generator(generator)
        rows = self._candidates(candidates)  # (M, C), all ranks
        if rows.shape[0] == 0:
            raise ValueError(
                "cannot initialize the edge container from 0 candidates: no edge pixel passed "
                "the selection (check the prediction has both classes, or lower the threshold)"
            )
        self._initialize_rows(rows, generator)

    def update(self, candidates: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Blend ``slots`` rows drawn from ``candidates`` into the bank (Eq. 7).

        Stores the new bank, detached, and returns it still attached to ``mixer``, so that
        using it in this step's forward (``EdgePrototypeAttention(x, bank)``) trains the mixer.
        With no candidates on any rank the bank is kept; before :meth:`initialize` this
        initialises instead. In both cases the stored bank is returned with a zero-valued link
        to ``mixer``, so every parameter is still in the graph (DDP needs that).

        Not for ``torch.compile(fullgraph=True)``: the candidate count is data-dependent.

        Args:
            candidates: edge features of shape (m, C); m may be 0. They are detached here.
            generator: generator of the draw (rank 0's is used under torch.distributed).

        Returns:
            The new bank C_h of shape (slots, C), in the graph through ``mixer``.
        """
        check_generator(generator)
        rows = self._candidates(candidates)  # (M, C), all ranks
        ready = bool(self.initialized)
        if rows.shape[0] == 0 or not ready:
            if rows.shape[0] > 0:
                self._initialize_rows(rows, generator)
            # 0 * (sum of the mixer) keeps the mixer in the graph with zero gradient (rule 11)
            link = 0.0 * (self.mixer.weight.sum() + self.mixer.bias.sum())
            return self.bank.clone() + link.to(self.bank.dtype)
        index = _shared_draw(rows.shape[0], self.slots, generator, rows.device)  # (n,)
        stacked = torch.cat([rows[index], self.bank])  # [E_h; C_{h-1}], (2n, C), a fresh copy
        bank = self.mixer(stacked.t()).t()  # Eq. 7 over the slot axis: (C, 2n) -> (C, n) -> (n, C)
        self._store(bank.detach())
        return bank

    def prototype(self, bank: Tensor | None = None) -> Tensor:
        """The edge prototype P_e, the mean of the bank rows (Eq. 8).

        Args:
            bank: a bank of shape (slots, C), e.g. the one :meth:`update` returned; None uses
                the stored bank.

        Returns:
            P_e of shape (C,).
        """
        if bank is None:
            bank = self.bank
        else:
            check_shape(bank, (self.slots, self.channels), "bank", "(slots, C)")
            check_floating(bank, "bank")
        return bank.mean(dim=0)  # (C,)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, slots={self.slots}"
