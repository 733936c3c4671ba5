"""Pictures of a paired study (examples/study.py): where CSC-PA wins and loses against SupOnly.

- :func:`per_image_scatter`: every test image of every paired fold, SupOnly's Dice against
  CSC-PA's; points above the diagonal are images CSC-PA segments better.
- :func:`difference_grid`: the test images where the two differ most, each as image (ground
  truth outlined), SupOnly's prediction and CSC-PA's, from the checkpoints each unit selected
  (``best.pt``, ``last.pt`` with ``--select last``, ``average.pt`` with ``--select average``);
  folds whose checkpoints are gone (a study restored from its committed results) are left out,
  and nothing is drawn without any.

Both need matplotlib (the ``examples`` extra).
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

__all__ = ["difference_grid", "per_image_scatter"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def per_image_scatter(pairs: Sequence[tuple[int, str, float, float]], path: Path, *, title: str = "") -> None:
    """``pairs``: (fold, image id, SupOnly Dice, CSC-PA Dice) in [0, 1]; one point each, by fold."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.2, 5), constrained_layout=True)
    folds = sorted({p[0] for p in pairs})
    for fold in folds:
        mine = [p for p in pairs if p[0] == fold]
        axis.scatter([100 * p[2] for p in mine], [100 * p[3] for p in mine], s=14, alpha=0.7, label=f"fold {fold}")
    axis.plot([0, 100], [0, 100], color="0.5", lw=1, ls="--")
    axis.set_xlim(-2, 102)
    axis.set_ylim(-2, 102)
    axis.set_aspect("equal")
    axis.set_xlabel("SupOnly Dice % (per test image)")
    axis.set_ylabel("CSC-PA Dice % (per test image)")
    better = sum(p[3] > p[2] for p in pairs)
    worse = sum(p[3] < p[2] for p in pairs)
    axis.set_title(title or f"{len(pairs)} images: CSC-PA better on {better}, worse on {worse}", fontsize=10)
    if len(folds) > 1:
        axis.legend(fontsize=8, loc="lower right")
    axis.grid(alpha=0.3)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _selected_checkpoint(unit_dir: Path) -> Path:
    """What the unit scored on test: average.pt (--select average), else best.pt, else last.pt."""
    for name in ("average.pt", "best.pt"):
        if (unit_dir / name).exists():
            return unit_dir / name
    return unit_dir / "last.pt"


def _predictions(unit_dir: Path, samples: list[Any], device: torch.device) -> list[np.ndarray]:
    from examples.engine.evaluate import predict_full
    from examples.models.trained import load_trained

    model, _ = load_trained(_selected_checkpoint(unit_dir), device)
    with torch.no_grad():
        return [predict_full(model, s.image.to(device), tuple(s.full_mask.shape)).cpu().numpy() for s in samples]


def difference_grid(study_dir: Path, pairs: Sequence[tuple[int, str, float, float]], path: Path, *,
                    count: int = 6, device: torch.device | str = "cpu") -> list[tuple[int, str, float, float]]:
    """The ``count`` test images with the largest |CSC-PA − SupOnly| Dice, as rows of (image
    with the ground truth outlined, SupOnly's prediction, CSC-PA's prediction). Returns the
    rows shown. The images and masks are read back through each unit's stored configuration."""
    from examples.engine.evaluate import overlay_picture
    from examples.data.folds import fold_data, open_dataset
    from examples.engine.checkpoint import read_checkpoint
    from examples.models.trained import trained_config

    plt = _pyplot()
    device = torch.device(device)
    # a unit restored from its committed results has no checkpoint to predict with: leave it out
    usable = {f for f in {p[0] for p in pairs}
              if all(_selected_checkpoint(study_dir / m / f"fold{f}").exists() for m in ("suponly", "cscpa"))}
    chosen = sorted((p for p in pairs if p[0] in usable), key=lambda p: -abs(p[3] - p[2]))[:count]
    if not chosen:
        return []
    rows: list[tuple[int, str, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    for fold in sorted({p[0] for p in chosen}):
        ids = [p[1] for p in chosen if p[0] == fold]
        unit = {m: study_dir / m / f"fold{fold}" for m in ("suponly", "cscpa")}
        state = read_checkpoint(_selected_checkpoint(unit["cscpa"]))
        config = dataclasses.replace(trained_config(state), fold=fold)
        data = fold_data(open_dataset(config), Path(config.split or study_dir / "splits.json"), config)
        positions = [data.test.index_of(i) for i in ids]
        samples = [data.test[p] for p in positions]
        predicted = {m: _predictions(d, samples, device) for m, d in unit.items()}
        for k, (position, sample) in enumerate(zip(positions, samples)):
            picture = data.test.load(position).image.permute(1, 2, 0).numpy()  # (H0, W0, 3) uint8, as on disk
            truth = sample.full_mask.numpy()
            rows.append((fold, sample.id, picture, truth, predicted["suponly"][k], predicted["cscpa"][k]))
    order = {(p[0], p[1]): i for i, p in enumerate(chosen)}
    rows.sort(key=lambda r: order[(r[0], r[1])])
    figure, axes = plt.subplots(len(rows), 3, figsize=(8, 2.7 * len(rows)), squeeze=False, constrained_layout=True)
    scores = {(p[0], p[1]): p for p in chosen}
    for axis_row, (fold, item, picture, truth, sup, csc) in zip(axes, rows):
        p = scores[(fold, item)]
        panels = [(overlay_picture(picture, np.zeros_like(truth), truth), f"fold {fold}: {Path(item).name}\nground truth"),
                  (overlay_picture(picture, sup, truth), f"SupOnly  Dice {100 * p[2]:.1f}"),
                  (overlay_picture(picture, csc, truth), f"CSC-PA  Dice {100 * p[3]:.1f}")]
        for axis, (panel, label) in zip(axis_row, panels):
            axis.imshow(panel)
            axis.set_title(label, fontsize=8)
            axis.axis("off")
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return list(chosen)
