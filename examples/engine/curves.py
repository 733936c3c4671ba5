"""A run's history as a CSV table (``metrics.csv``) and a picture (``curves.png``).

The trainer calls :func:`write_history` after every epoch, so both files follow a run as it goes.
Each history record is one epoch: ``val_dice`` and ``val_iou`` after it, ``train_*`` for the
epoch's last iteration, and ``mean_*`` for the mean over the epoch's iterations (these keys
are what the picture shows when they are there).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["COLUMNS", "plot_curves", "write_history", "write_metrics_csv"]

TERMS = ("loss", "ce_labeled", "pal_labeled", "ce_unlabeled", "pal_unlabeled", "pseudo_valid", "masked",
         "edge_candidates")
COLUMNS = ("epoch", "iteration", "val_dice", "val_iou", *(f"mean_{t}" for t in TERMS), *(f"train_{t}" for t in TERMS))
_LABELS = {"ce_labeled": "CE_l", "pal_labeled": "PAL_l", "ce_unlabeled": "CE_u", "pal_unlabeled": "PAL_u"}


def write_metrics_csv(history: Sequence[dict[str, Any]], path: Path) -> None:
    """One row per epoch with :data:`COLUMNS` (empty where a record lacks a value); pandas reads
    it with ``pd.read_csv(path)``."""
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        for record in history:
            writer.writerow({key: record.get(key, "") for key in COLUMNS})


def _series(history: Sequence[dict[str, Any]], term: str) -> list[float]:
    key = f"mean_{term}" if any(f"mean_{term}" in r for r in history) else f"train_{term}"
    return [float(r.get(key, math.nan)) for r in history]


def plot_curves(history: Sequence[dict[str, Any]], path: Path, *, title: str = "") -> None:
    """Val Dice per epoch, and the loss terms with the pseudo-label coverage, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    epochs = [int(r["epoch"]) for r in history]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, constrained_layout=True)
    top.plot(epochs, [100 * float(r.get("val_dice", math.nan)) for r in history], marker="o", ms=3, color="C0")
    top.set_ylabel("val Dice %")
    top.grid(alpha=0.3)
    if title:
        top.set_title(title)
    for index, term in enumerate(("ce_labeled", "pal_labeled", "ce_unlabeled", "pal_unlabeled")):
        values = _series(history, term)
        if any(v > 0 for v in values if not math.isnan(v)):
            bottom.plot(epochs, values, label=_LABELS[term], color=f"C{index + 1}")
    bottom.set_yscale("symlog", linthresh=1e-4)
    means = any("mean_loss" in r for r in history)
    bottom.set_ylabel("loss (epoch mean)" if means else "loss (last iteration)")
    bottom.set_xlabel("epoch")
    bottom.grid(alpha=0.3)
    coverage = _series(history, "pseudo_valid")
    if any(v > 0 for v in coverage if not math.isnan(v)):
        right = bottom.twinx()
        right.plot(epochs, [100 * v for v in coverage], color="0.4", ls="--", label="pseudo-label coverage")
        right.set_ylabel("pseudo-labels kept %")
        right.set_ylim(0, 100)
        right.legend(loc="upper right", fontsize=8)
    if bottom.get_legend_handles_labels()[0]:
        bottom.legend(loc="upper left", fontsize=8)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_history(history: Sequence[dict[str, Any]], out_dir: Path, *, title: str = "") -> None:
    """``metrics.csv`` and ``curves.png`` in ``out_dir``; the picture is skipped without
    matplotlib (it is in the ``examples`` extra)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_metrics_csv(history, out_dir / "metrics.csv")
    if not history:
        return
    try:
        plot_curves(history, out_dir / "curves.png", title=title)
    except ImportError:
        pass
