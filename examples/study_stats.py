"""A study's numbers: per-fold scores, mean ± std over folds, and the paired CSC-PA − SupOnly
difference with its bootstrap interval and Wilcoxon p-value."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from examples.study_units import METHODS, NAMES, Unit

__all__ = ["bootstrap_ci", "paired_scores", "paired_stats", "read_scores", "summarise", "table", "wilcoxon_p"]


def read_scores(path: Path) -> dict[str, tuple[float, float]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return {row["id"]: (float(row["dice"]), float(row["iou"])) for row in csv.DictReader(handle)}


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; zero differences dropped; nan with none left."""
    nonzero = diffs[diffs != 0]
    if nonzero.size == 0:
        return float("nan")
    from scipy.stats import wilcoxon

    return float(wilcoxon(nonzero).pvalue)


def bootstrap_ci(diffs: np.ndarray, resamples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of ``diffs`` over resamples of the images."""
    if diffs.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks keep memory small for large studies
        stop = min(start + 1000, resamples)
        picks = rng.integers(0, diffs.size, size=(stop - start, diffs.size))
        means[start:stop] = diffs[picks].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def summarise(out: Path, units: list[Unit], resamples: int) -> dict[str, Any]:
    """The study's numbers from the finished units' results.json and test_scores.csv."""
    folds: list[dict[str, Any]] = []
    per_image: dict[tuple[int, str], dict[str, tuple[float, float]]] = {}
    for unit in units:
        result = unit.directory(out) / "results.json"
        if not result.exists():
            continue
        data = json.loads(result.read_text())
        folds.append({"fold": unit.fold, "method": unit.method, "dice": data["test"]["dice"], "iou": data["test"]["iou"],
                      "images": data["test"]["images"], "selected_epoch": data["selected_epoch"],
                      "best_val_dice": data["best_val_dice"], "seconds": data["seconds"], "git_sha": data.get("git_sha")})
        per_image[(unit.fold, unit.method)] = read_scores(unit.directory(out) / "test_scores.csv")
    methods: dict[str, Any] = {}
    for method in METHODS:
        mine = [f for f in folds if f["method"] == method]
        if mine:
            dice = np.array([f["dice"] for f in mine])
            iou = np.array([f["iou"] for f in mine])
            methods[method] = {"folds": len(mine), "dice_mean": float(dice.mean()), "dice_std": float(dice.std()),
                               "iou_mean": float(iou.mean()), "iou_std": float(iou.std())}
    diffs, iou_diffs, paired_folds = [], [], []
    image_rows: list[dict[str, Any]] = []
    for fold in sorted({u.fold for u in units}):
        a, b = per_image.get((fold, "suponly")), per_image.get((fold, "cscpa"))
        if a is None or b is None:
            continue
        if set(a) != set(b):
            raise SystemExit(f"fold {fold}: SupOnly and CSC-PA were scored on different test images")
        paired_folds.append(fold)
        for image in sorted(a):
            diffs.append(b[image][0] - a[image][0])
            iou_diffs.append(b[image][1] - a[image][1])
            image_rows.append({"fold": fold, "id": image, "suponly_dice": a[image][0], "cscpa_dice": b[image][0],
                              "suponly_iou": a[image][1], "cscpa_iou": b[image][1]})
    paired = {"folds": paired_folds, **paired_stats(np.array(diffs), np.array(iou_diffs), resamples)}
    return {"folds": folds, "methods": methods, "paired": paired, "per_image": image_rows}


def paired_scores(baseline: dict[str, tuple[float, float]], candidate: dict[str, tuple[float, float]],
                  resamples: int) -> dict[str, Any]:
    """:func:`paired_stats` of candidate − baseline over the images both scored (``read_scores``'
    id -> (Dice, IoU) maps). Raises ValueError when they share no image."""
    shared = sorted(set(candidate) & set(baseline))
    if not shared:
        raise ValueError("the two share no test image")
    dice = np.array([candidate[k][0] - baseline[k][0] for k in shared])
    iou = np.array([candidate[k][1] - baseline[k][1] for k in shared])
    return paired_stats(dice, iou, resamples)


def paired_stats(dice_diffs: np.ndarray, iou_diffs: np.ndarray, resamples: int) -> dict[str, Any]:
    """Per-image differences (candidate − baseline) summarised: the mean Dice and IoU gains, the
    95% bootstrap interval of the Dice gain, the Wilcoxon p-value and the better/worse/tied counts."""
    low, high = bootstrap_ci(dice_diffs, resamples)
    return {
        "images": int(dice_diffs.size),
        "mean_diff_dice": float(dice_diffs.mean()) if dice_diffs.size else float("nan"),
        "mean_diff_iou": float(iou_diffs.mean()) if iou_diffs.size else float("nan"),
        "ci95": [low, high],
        "wilcoxon_p": wilcoxon_p(dice_diffs),
        "better": int((dice_diffs > 0).sum()),
        "worse": int((dice_diffs < 0).sum()),
        "tied": int((dice_diffs == 0).sum()),
    }


def table(summary: dict[str, Any]) -> str:
    def pct(x: float) -> str:
        return "—" if x is None or math.isnan(x) else f"{100 * x:.2f}"

    lines = ["| fold | SupOnly Dice | CSC-PA Dice | SupOnly IoU | CSC-PA IoU |", "|---|---|---|---|---|"]
    by = {(f["fold"], f["method"]): f for f in summary["folds"]}
    for fold in sorted({f["fold"] for f in summary["folds"]}):
        s, c = by.get((fold, "suponly"), {}), by.get((fold, "cscpa"), {})
        lines.append(f"| {fold} | {pct(s.get('dice', float('nan')))} | {pct(c.get('dice', float('nan')))} | "
                     f"{pct(s.get('iou', float('nan')))} | {pct(c.get('iou', float('nan')))} |")
    lines += ["", "| method | folds | Dice % (mean ± std over folds) | IoU % |", "|---|---|---|---|"]
    for method, m in summary["methods"].items():
        lines.append(f"| {NAMES[method]} | {m['folds']} | {pct(m['dice_mean'])} ± {pct(m['dice_std'])} | "
                     f"{pct(m['iou_mean'])} ± {pct(m['iou_std'])} |")
    p = summary["paired"]
    if p["images"]:
        lines += ["", f"paired CSC-PA − SupOnly over {p['images']} test images of folds {p['folds']}: "
                      f"Dice {100 * p['mean_diff_dice']:+.2f} points, 95% CI [{100 * p['ci95'][0]:+.2f}, "
                      f"{100 * p['ci95'][1]:+.2f}] (bootstrap over images), Wilcoxon p = {p['wilcoxon_p']:.3g}; "
                      f"better on {p['better']}, worse on {p['worse']}, tied on {p['tied']}"]
    return "\n".join(lines)
