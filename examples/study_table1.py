"""The paper's Table 1 layout for a study (examples/study.py): methods × labeled fractions.

Rows are the methods, columns the labeled fractions in increasing order (1/8, 1/4, 1/2, as in
the paper), and each cell is test Dice % ± std and IoU % ± std over the folds (the mean of each
fold's per-image mean, and the population standard deviation over folds, as in the study's
per-method table). Beside it, per fraction, the paired CSC-PA − SupOnly statistics over the
test images of the folds where both methods are finished.

- :func:`fraction_tag`: a fraction's folder name, ``"1/8"`` → ``"1of8"``;
- :func:`table1`: the table as JSON-ready numbers (fractions in [0, 1]) from per-fraction
  study summaries;
- :func:`table1_markdown`: the same as Markdown, in percent.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Mapping

__all__ = ["FRACTIONS", "fraction_tag", "table1", "table1_markdown"]

# The labeled fractions train_busi.py accepts, in the paper's column order.
FRACTIONS = ("1/8", "1/4", "1/2")
NAMES = {"suponly": "SupOnly", "cscpa": "CSC-PA"}
_PAIRED_KEYS = ("folds", "images", "mean_diff_dice", "mean_diff_iou", "ci95", "wilcoxon_p", "better", "worse", "tied")


def fraction_tag(fraction: str) -> str:
    """The folder of a fraction's units in a multi-fraction study.

    Example:
        >>> fraction_tag("1/8")
        '1of8'
    """
    numerator, denominator = fraction.split("/")
    return f"{numerator}of{denominator}"


def table1(summaries: Mapping[str, Mapping[str, Any]], folds: int) -> dict[str, Any]:
    """Table 1 from ``{fraction: summary}``, a summary being what ``study.summarise`` returns.

    Args:
        summaries: per labeled fraction, the study's summary of that fraction's units
            (``methods`` and ``paired`` are read).
        folds: the number of folds the study asks for, so that a cell over fewer says so.

    Returns:
        ``{"fractions": [...], "folds": folds, "rows": [{"method", "name", "cells": {fraction:
        {"folds", "dice_mean", "dice_std", "iou_mean", "iou_std"} or None}}], "paired":
        {fraction: the paired statistics without the per-image rows}}``; numbers are fractions
        in [0, 1], a cell is None where the method has no finished fold.

    Example:
        >>> s = {"methods": {"suponly": {"folds": 2, "dice_mean": 0.5, "dice_std": 0.1,
        ...                  "iou_mean": 0.4, "iou_std": 0.1}}, "paired": {"images": 0}}
        >>> t = table1({"1/4": s, "1/8": s}, folds=2)
        >>> t["fractions"], t["rows"][0]["cells"]["1/8"]["dice_mean"], t["rows"][1]["cells"]["1/4"]
        (['1/8', '1/4'], 0.5, None)
    """
    fractions = sorted(summaries, key=Fraction)
    rows = []
    for method, name in NAMES.items():
        cells = {f: (dict(summaries[f]["methods"][method]) if method in summaries[f]["methods"] else None)
                 for f in fractions}
        rows.append({"method": method, "name": name, "cells": cells})
    paired = {f: {k: summaries[f]["paired"][k] for k in _PAIRED_KEYS if k in summaries[f]["paired"]}
              for f in fractions}
    return {"fractions": fractions, "folds": folds, "rows": rows, "paired": paired}


def _pct(x: float | None) -> str:
    return "—" if x is None or math.isnan(x) else f"{100 * x:.2f}"


def _points(x: float) -> str:
    return "—" if math.isnan(x) else f"{100 * x:+.2f}"


def table1_markdown(table: Mapping[str, Any]) -> str:
    """:func:`table1`'s result as two Markdown tables: Table 1, then the paired statistics.

    Example:
        >>> s = {"methods": {"cscpa": {"folds": 1, "dice_mean": 0.5, "dice_std": 0.0,
        ...                  "iou_mean": 0.25, "iou_std": 0.0}}, "paired": {"images": 0}}
        >>> print(table1_markdown(table1({"1/8": s}, folds=2)).splitlines()[5])
        | CSC-PA | 50.00 ± 0.00, 25.00 ± 0.00 (1/2 folds) |
    """
    fractions = table["fractions"]
    folds = table["folds"]
    lines = [
        "Table 1 layout: test Dice % ± std, IoU % ± std over folds (population std; a cell over fewer "
        f"than the study's {folds} folds says how many)",
        "",
        "| method | " + " | ".join(f"{f} labeled" for f in fractions) + " |",
        "|---|" + "---|" * len(fractions),
    ]
    for row in table["rows"]:
        cells = []
        for f in fractions:
            c = row["cells"][f]
            if c is None:
                cells.append("—")
                continue
            text = f"{_pct(c['dice_mean'])} ± {_pct(c['dice_std'])}, {_pct(c['iou_mean'])} ± {_pct(c['iou_std'])}"
            cells.append(text + (f" ({c['folds']}/{folds} folds)" if c["folds"] < folds else ""))
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Paired CSC-PA − SupOnly per fraction, over the test images of the folds where both are finished "
                  "(Dice difference in points, 95% bootstrap CI over images, two-sided Wilcoxon signed-rank p):", "",
              "| labeled | folds | images | Dice diff | 95% CI | IoU diff | Wilcoxon p | better / worse / tied |",
              "|---|---|---|---|---|---|---|---|"]
    for f in fractions:
        p = table["paired"][f]
        if not p.get("images"):
            lines.append(f"| {f} | — | 0 | — | — | — | — | — |")
            continue
        low, high = p["ci95"]
        lines.append(f"| {f} | {', '.join(str(k) for k in p['folds'])} | {p['images']} | {_points(p['mean_diff_dice'])} | "
                     f"[{_points(low)}, {_points(high)}] | {_points(p['mean_diff_iou'])} | {p['wilcoxon_p']:.3g} | "
                     f"{p['better']} / {p['worse']} / {p['tied']} |")
    return "\n".join(lines)
