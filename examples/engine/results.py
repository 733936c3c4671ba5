"""What a run writes besides checkpoints: per fold ``results.json`` and ``test_scores.csv``, per
run ``summary.md``, ``summary.json`` and ``summary.csv`` with the paper's table."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from examples.engine.config import TrainConfig
from examples.engine.distributed import git_sha
from examples.engine.evaluate import Evaluation
from examples.engine.metrics import mean_std

__all__ = ["FoldResult", "table", "write_fold_results", "write_summary"]

NAMES = {"cscpa": "CSC-PA", "suponly": "SupOnly"}


@dataclass
class FoldResult:
    method: str
    fold: int
    test: Evaluation
    selected_epoch: int
    best_val_dice: float
    history: list[dict[str, float]]
    seconds: float


def write_fold_results(out_dir: Path, config: TrainConfig, result: FoldResult, *, git_shas: list[str],
                       device: torch.device, world_size: int) -> None:
    """``results.json`` (the config, the code, the test scores and the history) and the per-image
    ``test_scores.csv`` of one fold."""
    test = result.test
    summary = {
        "method": config.method,
        "fold": config.fold,
        "config": dataclasses.asdict(config),
        "git_sha": git_shas[-1] if git_shas else git_sha(),
        "git_shas": git_shas,
        "torch": torch.__version__,
        "device": str(device),
        "world_size": world_size,
        "selected_epoch": result.selected_epoch,
        "best_val_dice": result.best_val_dice,
        "test": {"dice": test.dice, "dice_std": test.dice_std, "iou": test.iou, "iou_std": test.iou_std,
                 "images": len(test.scores)},
        "history": result.history,
        "seconds": result.seconds,
    }
    (out_dir / "results.json").write_text(json.dumps(summary, indent=2))
    lines = ["id,dice,iou"] + [f'"{s.id}",{s.dice:.6f},{s.iou:.6f}' for s in test.scores]
    (out_dir / "test_scores.csv").write_text("\n".join(lines) + "\n")


def table(results: list[FoldResult]) -> str:
    """The paper's format: per method, Dice and IoU in %, mean ± std over folds."""
    lines = ["| method | folds | Dice % | IoU % |", "|---|---|---|---|"]
    for method in dict.fromkeys(r.method for r in results):
        mine = [r for r in results if r.method == method]
        name = NAMES.get(method, method)
        if len(mine) == 1:
            t = mine[0].test
            lines.append(f"| {name} | {mine[0].fold} | {100 * t.dice:.2f} ± {100 * t.dice_std:.2f} (over images) | "
                         f"{100 * t.iou:.2f} ± {100 * t.iou_std:.2f} (over images) |")
        else:
            dice, dice_sd = mean_std([r.test.dice for r in mine])
            iou, iou_sd = mean_std([r.test.iou for r in mine])
            lines.append(f"| {name} | {len(mine)} | {100 * dice:.2f} ± {100 * dice_sd:.2f} | {100 * iou:.2f} ± "
                         f"{100 * iou_sd:.2f} |")
    return "\n".join(lines)


def write_summary(out: Path, args: argparse.Namespace, results: list[FoldResult]) -> str:
    """``summary.md`` (the table, also returned), ``summary.json`` and ``summary.csv`` in ``out``."""
    summary = table(results)
    (out / "summary.md").write_text(summary + "\n")
    (out / "summary.json").write_text(json.dumps({
        "git_sha": git_sha(), "args": vars(args),
        "results": [{"method": r.method, "fold": r.fold, "dice": r.test.dice, "dice_std": r.test.dice_std,
                     "iou": r.test.iou, "iou_std": r.test.iou_std, "selected_epoch": r.selected_epoch,
                     "best_val_dice": r.best_val_dice, "seconds": r.seconds} for r in results],
    }, indent=2))
    rows = ["method,fold,dice,dice_std,iou,iou_std,selected_epoch,seconds"] + [
        f"{r.method},{r.fold},{r.test.dice:.6f},{r.test.dice_std:.6f},{r.test.iou:.6f},{r.test.iou_std:.6f},"
        f"{r.selected_epoch},{r.seconds:.1f}"
        for r in results
    ]
    (out / "summary.csv").write_text("\n".join(rows) + "\n")
    return summary
