"""The interface every dataset in ``examples`` shares: ids, strata, subsets, transforms.

A dataset is a list of items, each with an ``id`` (a path relative to the data directory,
which is what split files store) and a ``label`` (its stratum for stratified splits: the
BUSI class, the phantom's lesion count, or ``"all"``). ``dataset[i]`` loads item i as a
:class:`~examples.data.samples.RawSample` and applies the transform; ``dataset.subset(ids)`` is
how a trainer builds its labeled and unlabeled sets from a split file.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Iterable

import numpy as np
from torch.utils.data import Dataset

from examples.data.samples import RawSample

__all__ = ["SegmentationDataset", "Transform", "natural_key"]

Transform = Callable[[RawSample], Any]


def natural_key(text: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders digit runs by value: ``benign (2)`` before ``benign (10)``.

    Example:
        >>> sorted(["b (10)", "b (2)", "a"], key=natural_key)
        ['a', 'b (2)', 'b (10)']
    """
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


class SegmentationDataset(Dataset[Any]):
    """Base class of every dataset: subclasses fill ``items``, ``ids`` and ``labels`` and implement
    ``load_item`` (docs/data.md, "Your own dataset").

    Attributes:
        ids: item ids in dataset order.
        labels: one stratum label per item.
        transform: applied by ``__getitem__`` to the :class:`RawSample`; see
            :mod:`examples.data.transforms`.
    """

    def __init__(self, transform: Transform) -> None:
        self.transform = transform
        self.ids: list[str] = []
        self.labels: list[str] = []
        self.items: list[Any] = []

    def load_item(self, item: Any, item_id: str) -> RawSample:
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, index: int) -> RawSample:
        """Item ``index`` decoded but not transformed: uint8 (3, H, W) image, (H, W) mask."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for a dataset of {len(self)} items")
        return self.load_item(self.items[index], self.ids[index])

    def load_grey(self, index: int) -> np.ndarray:
        """Item ``index``'s image as (H, W) uint8 greyscale, for hashing (no mask decoded)."""
        return self.load(index).image[0].numpy()

    def __getitem__(self, index: int) -> Any:
        return self.transform(self.load(index))

    def index_of(self, item_id: str) -> int:
        """Position of ``item_id`` in this dataset."""
        positions = self._positions()
        if item_id not in positions:
            raise KeyError(f"{item_id!r} is not an id of this dataset ({self!r})")
        return positions[item_id]

    def _positions(self) -> dict[str, int]:
        return {item_id: i for i, item_id in enumerate(self.ids)}

    def subset(self, ids: Iterable[str]) -> "SegmentationDataset":
        """A dataset of the same kind holding only ``ids``, in the given order.

        Every id must exist in this dataset and appear once; otherwise a ``KeyError`` or
        ``ValueError`` lists the offending ids (e.g. a split file made for other data).
        """
        wanted = list(ids)
        positions = self._positions()
        missing = [i for i in wanted if i not in positions]
        if missing:
            shown = ", ".join(repr(m) for m in missing[:5]) + (" ..." if len(missing) > 5 else "")
            raise KeyError(
                f"{len(missing)} of {len(wanted)} ids are not in this dataset ({self!r}): {shown}; "
                "was the split file made for another data directory?"
            )
        if len(set(wanted)) != len(wanted):
            repeated = sorted({i for i in wanted if wanted.count(i) > 1}, key=natural_key)
            raise ValueError(f"subset ids must be unique, repeated: {repeated[:5]}")
        out = copy.copy(self)
        out.items = [self.items[positions[i]] for i in wanted]
        out.ids = list(wanted)
        out.labels = [self.labels[positions[i]] for i in wanted]
        return out

    def with_transform(self, transform: Transform) -> "SegmentationDataset":
        """The same items with another transform (e.g. the eval transform on the val ids)."""
        out = copy.copy(self)
        out.transform = transform
        return out

    def label_counts(self) -> dict[str, int]:
        """Number of items per stratum label."""
        counts: dict[str, int] = {}
        for label in self.labels:
            counts[label] = counts.get(label, 0) + 1
        return dict(sorted(counts.items()))
