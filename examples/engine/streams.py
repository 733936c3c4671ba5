"""Deterministic batches: what a step sees is a function of the seed and the step number.

Each stream is an endless sequence of dataset indices made of one seeded permutation per pass
over the dataset. Global step t takes positions [t·B·W, (t+1)·B·W) of the stream, and rank r
of W takes its B of them. Each index travels with its own augmentation seed, so a run resumed
at step t draws exactly the batches and augmentations that an uninterrupted run would have,
whatever the number of data-loader workers.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from examples.data.samples import collate_samples


def mix_seed(*parts: int | str) -> int:
    """A 63-bit seed from several parts, stable across processes and Python versions."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class IndexStream:
    """Endless shuffled passes over ``range(size)``; pass p is permutation(seed, tag, p)."""

    def __init__(self, size: int, *, seed: int, tag: str) -> None:
        if size <= 0:
            raise ValueError(f"cannot draw batches from an empty set ({tag}): size {size}")
        self.size, self.seed, self.tag = size, seed, tag
        self._cache: dict[int, list[int]] = {}

    def _permutation(self, pass_index: int) -> list[int]:
        if pass_index not in self._cache:
            generator = torch.Generator().manual_seed(mix_seed(self.seed, self.tag, pass_index))
            self._cache = {pass_index: torch.randperm(self.size, generator=generator).tolist()}
        return self._cache[pass_index]

    def batch(self, step: int, batch_size: int, *, rank: int = 0, world: int = 1) -> list[tuple[int, int]]:
        """(index, augmentation seed) pairs of ``rank``'s share of global step ``step``."""
        start = (step * world + rank) * batch_size
        items = []
        for position in range(start, start + batch_size):
            index = self._permutation(position // self.size)[position % self.size]
            items.append((index, mix_seed(self.seed, self.tag, "aug", position)))
        return items


class StreamBatches(Sampler[list[tuple[int, int]]]):
    """Batch sampler over steps [first, last) of a stream, for a DataLoader."""

    def __init__(self, stream: IndexStream, first: int, last: int, batch_size: int, *, rank: int = 0, world: int = 1) -> None:
        self.stream, self.first, self.last = stream, first, last
        self.batch_size, self.rank, self.world = batch_size, rank, world

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.first, self.last):
            yield self.stream.batch(step, self.batch_size, rank=self.rank, world=self.world)

    def __len__(self) -> int:
        return max(0, self.last - self.first)


class SeededItems(Dataset[Any]):
    """Wraps a dataset so that item ``(index, seed)`` is drawn with torch's RNG seeded to
    ``seed``: random augmentations become a pure function of the stream position."""

    def __init__(self, base: Dataset[Any]) -> None:
        self.base = base

    def __len__(self) -> int:
        return len(self.base)  # type: ignore[arg-type]

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.base[index]


def loader(dataset: Any, sampler: "StreamBatches", workers: int) -> DataLoader[Any]:
    """The batches ``sampler`` draws from ``dataset``, each item seeded by its place in the stream."""
    return DataLoader(SeededItems(dataset), batch_sampler=sampler, collate_fn=collate_samples, num_workers=workers,
                      persistent_workers=False)


def paired_batches(labeled: Any, unlabeled: Any | None, labeled_stream: IndexStream, unlabeled_stream: IndexStream | None,
                   first: int, last: int, batch: int, *, rank: int, world: int, workers: int) -> Iterator[tuple[Any, Any]]:
    """Steps [first, last) of ``labeled_stream`` over ``labeled``, each paired with the same step
    of ``unlabeled_stream`` over ``unlabeled``, or with None when ``unlabeled`` is None (a method
    that never reads the unlabeled images does not load them)."""
    labeled_batches = loader(labeled, StreamBatches(labeled_stream, first, last, batch, rank=rank, world=world), workers)
    if unlabeled is None or unlabeled_stream is None:
        for item in labeled_batches:
            yield item, None
        return
    unlabeled_batches = loader(unlabeled, StreamBatches(unlabeled_stream, first, last, batch, rank=rank, world=world), workers)
    yield from zip(labeled_batches, unlabeled_batches)
