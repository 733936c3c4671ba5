"""A training run: every requested fold and method, then the summary (the trainer's ``main``).

``python -m examples.train_busi ARGS`` is :func:`main`. A program of your own calls it with its
own network (:mod:`examples.models.protocol`) and, through the registry, its own data::

    from examples.data.registry import register_dataset
    from examples.engine.run import main

    register_dataset("my-scans", my_scans)
    main(["--data", "my-scans", "--method", "cscpa"], build_model=MyNet.from_config)
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from examples.data.folds import fold_data, open_dataset, split_file
from examples.engine.arguments import config_for, parse_args
from examples.engine.distributed import pick_device, setup_distributed
from examples.engine.results import FoldResult, write_summary
from examples.engine.trainer import FoldTrainer
from examples.models.deeplab import DeepLabV3Plus
from examples.models.protocol import ModelBuilder

__all__ = ["build_model", "main"]


def build_model(config: object) -> torch.nn.Module:
    """The reference network of a run (:meth:`DeepLabV3Plus.from_config`), or a SystemExit
    that says why it cannot be built (an unknown backbone, weights offline, ...)."""
    try:
        return DeepLabV3Plus.from_config(config)
    except (RuntimeError, ImportError, ValueError) as error:
        raise SystemExit(str(error)) from error


def main(argv: list[str] | None = None, *, build_model: ModelBuilder = build_model,
         description: str | None = None) -> int:
    """Train the folds and methods ``argv`` asks for, with networks from ``build_model``."""
    args = parse_args(argv, description)
    if args.sync_bn and pick_device(args.device).type != "cuda":
        raise SystemExit("--sync-bn needs CUDA processes (PyTorch's SyncBatchNorm runs on GPUs only); on CPU, drop it: "
                         "each process then normalises with its own batch statistics")
    device = setup_distributed(args.device)
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    log = print if rank_zero else (lambda *_: None)
    torch.manual_seed(args.seed)
    methods = ["suponly", "cscpa"] if args.method == "both" else [args.method]
    first = config_for(args, methods[0], 0)  # the data settings, the same for every fold and method
    dataset = open_dataset(first, verify=args.verify_data)
    path = split_file(first, rank_zero)
    with open(path, encoding="utf-8") as handle:
        fold_count = len(json.load(handle)["folds"])
    if args.folds == "all":
        args.fold = "all"
    if args.fold != "all" and not args.fold.isdigit():
        raise SystemExit(f"--fold must be 'all' or a fold index, got {args.fold!r}")
    folds = list(range(fold_count)) if args.fold == "all" else [int(args.fold)]
    if any(not 0 <= f < fold_count for f in folds):
        raise SystemExit(f"--fold must be 'all' or in [0, {fold_count - 1}] for {path}, got {args.fold}")
    log(f"data {args.data}: {len(dataset)} images; split {path}; folds {folds}; methods {methods}; device {device}")
    results: list[FoldResult] = []
    for fold in folds:
        data = fold_data(dataset, path, config_for(args, methods[0], fold))
        log(f"fold {fold}: {len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled, {len(data.val)} val, {len(data.test)} test")
        for method in methods:
            config = config_for(args, method, fold)
            out_dir = Path(args.out) / method / f"fold{fold}"
            # A network's random initialisation depends on --seed only, never on what ran before it:
            # each method and fold of one run starts as a run of that method and fold alone would.
            torch.manual_seed(args.seed)
            trainer = FoldTrainer(config, data, build_model(config), out_dir, device)
            results.append(trainer.run(log=log))
    if rank_zero:
        print("\n" + write_summary(Path(args.out), args, results))
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0
