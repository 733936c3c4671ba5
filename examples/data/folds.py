"""One fold's four datasets from a run's config: the dataset, its split file, and the subsets.

Used by the trainer, ``study`` and ``diagnose``, which all need the data exactly as a run saw it.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch.distributed as dist

from examples.data.base import SegmentationDataset
from examples.data.folders import DataError
from examples.data.registry import build_dataset
from examples.data.splits import DEFAULT_FRACTIONS, load_split
from examples.data.transforms import EvalTransform, TrainTransform
from examples.engine.config import TrainConfig

__all__ = ["FoldData", "fold_data", "open_dataset", "split_file"]


class FoldData(NamedTuple):
    labeled: SegmentationDataset
    unlabeled: SegmentationDataset
    val: SegmentationDataset
    test: SegmentationDataset


def open_dataset(config: TrainConfig, *, verify: bool = False) -> SegmentationDataset:
    """``config.data`` (a registered name or a folder), or a SystemExit that names it."""
    try:
        # The phantom's content is fixed (seed 0); --seed changes the training, not the data.
        return build_dataset(config.data, include_normal=config.include_normal, phantom_count=config.phantom_images,
                             phantom_lesion_free=config.phantom_lesion_free,
                             phantom_hyperechoic=config.phantom_hyperechoic, verify=verify)
    except (DataError, FileNotFoundError) as error:
        raise SystemExit(f"--data {config.data!r}: {error}") from error


def split_file(config: TrainConfig, main: bool) -> Path:
    """The split file to use: ``config.split``, or one made once (and then reused) in ``config.out``."""
    if config.split:
        path = Path(config.split)
        if not path.is_file():
            raise SystemExit(f"--split {path}: no such file (make one with python -m examples.make_splits)")
        return path
    path = Path(config.out) / "splits.json"
    if main and not path.exists():
        from examples.make_splits import main as make_splits  # the command, run as a user would

        print(f"no --split given: finding duplicates and writing a 5-fold split to {path}", flush=True)
        command = [config.data, "--out", str(path), "--folds", "5", "--seed", str(config.seed), "--quiet"]
        command += ["--count", str(config.phantom_images)] if config.data == "phantom" else []
        command += ["--include-normal"] if config.include_normal else []
        command += ["--no-lesion-free"] if config.data == "phantom" and not config.phantom_lesion_free else []
        if config.labeled not in DEFAULT_FRACTIONS:  # only then, so a default run writes the same file as before
            command += ["--fractions", *DEFAULT_FRACTIONS, config.labeled]
        if make_splits(command) != 0:
            raise SystemExit(f"could not write a split file for --data {config.data!r} (see the error above)")
    if dist.is_initialized():
        dist.barrier()
    return path


def fold_data(dataset: SegmentationDataset, path: Path, config: TrainConfig) -> FoldData:
    """Fold ``config.fold`` of split file ``path`` at ``config.labeled``, with the training and
    evaluation transforms of ``config``."""
    split = load_split(path, config.fold, config.labeled)
    if not split.val and config.select == "best":
        # The checkpoint is chosen on val, never on test: without val there is nothing to choose on.
        raise SystemExit(f"fold {config.fold} of {path} has no val part, so --select best has nothing to choose on: "
                         "pass --select last (the last epoch is the model) or --select average, or remake the split with "
                         "python -m examples.make_splits --val-fraction 0.1")
    train = TrainTransform(config.crop, base_size=config.resize)
    evaluation = EvalTransform(config.eval_size or config.resize or config.crop)
    try:
        return FoldData(
            dataset.subset(split.labeled).with_transform(train),
            dataset.subset(split.unlabeled).with_transform(train),
            dataset.subset(split.val).with_transform(evaluation),
            dataset.subset(split.test).with_transform(evaluation),
        )
    except (KeyError, ValueError) as error:
        raise SystemExit(f"--split {path} does not fit --data {config.data!r}: {error}") from error
