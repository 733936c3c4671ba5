"""The dataset registry: ``--data NAME`` is a registered name, else a folder whose layout is detected.

Register your own dataset once, before the trainer runs, and every command that takes
``--data`` (the trainer, ``make_splits``, ``study``) reads it by name; no file of ours needs
editing (docs/data.md, "Your own dataset")::

    from examples.data.registry import DataOptions, register_dataset

    def my_scans(options: DataOptions) -> SegmentationDataset:
        return MyScans("/data/scans", transform=options.transform)

    register_dataset("my-scans", my_scans)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from examples.data.base import SegmentationDataset, Transform
from examples.data.phantom import PHANTOM_COUNT, PHANTOM_SIZE
from examples.data.folders import BUSIDataset, DataError, ImageMaskFolder, is_busi, not_a_dataset, paired_layout

__all__ = ["DATASETS", "DataOptions", "DatasetBuilder", "build_dataset", "register_dataset"]


@dataclass(frozen=True)
class DataOptions:
    """What a builder may use; a builder ignores what does not apply to its data.

    Attributes:
        transform: applied to each :class:`~examples.data.samples.RawSample`; None: the
            dataset's default (:class:`~examples.data.transforms.NormalizeTransform`).
        include_normal: BUSI only, also load ``normal/``.
        verify, skip_bad: decode every file up front; leave bad ones out with a warning.
        phantom_count, phantom_size, phantom_seed: the phantom's number of images, side, seed.
        phantom_lesion_free: the phantom keeps its lesion-free images (False: left out, as
            ``include_normal=False`` leaves out BUSI's ``normal/``).
        phantom_hyperechoic: the probability that a phantom lesion is brighter than the tissue.
    """

    transform: Transform | None = None
    include_normal: bool = False
    verify: bool = False
    skip_bad: bool = False
    phantom_count: int = PHANTOM_COUNT
    phantom_size: int = PHANTOM_SIZE
    phantom_seed: int = 0
    phantom_lesion_free: bool = True
    phantom_hyperechoic: float = 0.0


DatasetBuilder = Callable[[DataOptions], SegmentationDataset]


def _phantom(options: DataOptions) -> SegmentationDataset:
    from examples.data.phantom_dataset import PhantomDataset  # numpy rendering, only when asked for

    return PhantomDataset(options.phantom_count, size=options.phantom_size, seed=options.phantom_seed,
                          lesion_free=options.phantom_lesion_free, hyperechoic=options.phantom_hyperechoic,
                          transform=options.transform)


# name -> builder; "phantom" is built in, register_dataset adds to it
DATASETS: dict[str, DatasetBuilder] = {"phantom": _phantom}


def register_dataset(name: str, builder: DatasetBuilder, *, replace: bool = False) -> None:
    """Make ``--data name`` (and :func:`build_dataset(name) <build_dataset>`) build ``builder(options)``.

    Raises:
        ValueError: ``name`` is empty or already registered (pass ``replace=True`` to override).
        TypeError: ``builder`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(builder):
        raise TypeError(f"builder must be callable (DataOptions -> SegmentationDataset), got {type(builder).__name__}")
    if name in DATASETS and not replace:
        raise ValueError(f"a dataset named {name!r} is already registered; pass replace=True to override it")
    DATASETS[name] = builder


def build_dataset(spec: str | Path, *, transform: Transform | None = None, include_normal: bool = False,
                  verify: bool = False, skip_bad: bool = False, phantom_count: int = DataOptions.phantom_count,
                  phantom_size: int = DataOptions.phantom_size,
                  phantom_seed: int = DataOptions.phantom_seed,
                  phantom_lesion_free: bool = DataOptions.phantom_lesion_free,
                  phantom_hyperechoic: float = DataOptions.phantom_hyperechoic) -> SegmentationDataset:
    """A dataset from a registered name (``phantom`` is built in) or a folder path (BUSI or
    images/ + masks/, detected).

    Args:
        spec: a name in :data:`DATASETS`, or a data directory.
        transform, include_normal, verify, skip_bad, phantom_count, phantom_size, phantom_seed,
        phantom_lesion_free, phantom_hyperechoic:
            see :class:`DataOptions`.

    Raises:
        DataError: not a registered name, and the folder is missing, is not a dataset, or holds
            bad files.
        TypeError: a registered builder returned something that is not a SegmentationDataset.

    Example:
        >>> ds = build_dataset("phantom", phantom_count=3, phantom_size=64)
        >>> ds.ids[0], tuple(ds[0].image.shape), ds[0].mask.dtype
        ('phantom/000000', (3, 64, 64), torch.int64)
    """
    options = DataOptions(transform, include_normal, verify, skip_bad, phantom_count, phantom_size, phantom_seed,
                          phantom_lesion_free, phantom_hyperechoic)
    builder = DATASETS.get(str(spec))
    if builder is not None:
        dataset = builder(options)
        if not isinstance(dataset, SegmentationDataset):
            raise TypeError(f"the builder registered as {str(spec)!r} returned a {type(dataset).__name__}, "
                            "expected a SegmentationDataset")
        return dataset
    root = Path(spec)
    if root.is_dir() and is_busi(root):
        return BUSIDataset(root, include_normal=include_normal, transform=transform, verify=verify, skip_bad=skip_bad)
    if root.is_dir() and paired_layout(root) is not None:
        return ImageMaskFolder(root, transform=transform, verify=verify, skip_bad=skip_bad)
    message = not_a_dataset(root)
    if not root.exists():
        message += f"; registered dataset names: {', '.join(sorted(DATASETS))}"
    raise DataError(message)
