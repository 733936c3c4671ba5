"""The paper's Table 2 layout: ablation rows on one fold, each paired against SupOnly.

Each row is one finished unit folder of :mod:`examples.train_busi` or :mod:`examples.study`
(its ``results.json`` and ``test_scores.csv``). The first row is the baseline; every other row
gets its test Dice and IoU and the paired difference to the baseline over the test images both
scored (the mean, a 95% bootstrap interval over images and the Wilcoxon signed-rank p-value), so
that each part's contribution reads as a gain over SupOnly with its uncertainty.

    python -m examples.study_table2 \\
        "SupOnly=docs/results/busi-dev-1of8-units/suponly/fold0" \\
        "+FPA=runs/ablation-1of8/no-epa-no-pal/cscpa/fold0" \\
        "all=docs/results/busi-dev-1of8-units/cscpa/fold0" --json table2.json

- :func:`table2`: the rows as JSON-ready numbers (fractions in [0, 1]);
- :func:`table2_markdown`: the same as Markdown, in percent.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

from examples.study_stats import paired_scores, read_scores

__all__ = ["table2", "table2_markdown"]


def _unit(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[float, float]]]:
    results, scores = folder / "results.json", folder / "test_scores.csv"
    for path in (results, scores):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: is {folder} a finished unit (results.json, test_scores.csv)?")
    return json.loads(results.read_text()), read_scores(scores)


def table2(rows: Sequence[tuple[str, Path]], resamples: int = 10_000) -> dict[str, Any]:
    """Scores of each row's unit, and of each row but the first paired against the first.

    Args:
        rows: (label, unit folder) pairs; the first is the baseline.
        resamples: bootstrap resamples of the images for the 95% interval.

    Returns:
        ``{"baseline": label, "rows": [...]}``, each row with ``label``, ``unit``, ``dice``,
        ``iou``, ``best_val_dice``, ``selected_epoch``, ``git_sha`` and, but for the baseline,
        ``paired``: ``images``, ``mean_diff_dice``, ``ci95``, ``mean_diff_iou``, ``wilcoxon_p``,
        ``better``, ``worse``, ``tied``.
    """
    if not rows:
        raise ValueError("table2 needs at least one row (the baseline)")
    units = [(label, folder, *_unit(Path(folder))) for label, folder in rows]
    base_label, base_folder, _, base_scores = units[0]
    out: list[dict[str, Any]] = []
    for index, (label, folder, results, scores) in enumerate(units):
        row: dict[str, Any] = {
            "label": label, "unit": str(folder), "dice": results["test"]["dice"], "iou": results["test"]["iou"],
            "best_val_dice": results.get("best_val_dice"), "selected_epoch": results.get("selected_epoch"),
            "git_sha": results.get("git_sha"),
        }
        if index > 0:
            try:
                row["paired"] = paired_scores(base_scores, scores, resamples)
            except ValueError:
                raise ValueError(f"{folder} and the baseline {base_folder} share no test image") from None
        out.append(row)
    return {"baseline": base_label, "rows": out}


def table2_markdown(table: dict[str, Any]) -> str:
    """The table in percent: test Dice and IoU, best val Dice, and the paired gain over the baseline."""
    lines = [
        f"| row | test Dice % | test IoU % | best val Dice % (epoch) | Dice − {table['baseline']} [95% CI] | Wilcoxon p | better / worse / tied |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in table["rows"]:
        val = row["best_val_dice"]
        val_text = "—" if val is None else f"{100 * val:.2f} ({row['selected_epoch']})"
        paired = row.get("paired")
        if paired is None:
            gain = p = counts = "(baseline)"
        else:
            low, high = paired["ci95"]
            gain = f"{100 * paired['mean_diff_dice']:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
            p = "—" if math.isnan(paired["wilcoxon_p"]) else f"{paired['wilcoxon_p']:.3g}"
            counts = f"{paired['better']} / {paired['worse']} / {paired['tied']}"
        lines.append(f"| {row['label']} | {100 * row['dice']:.2f} | {100 * row['iou']:.2f} | {val_text} | {gain} | {p} | {counts} |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", metavar="LABEL=UNIT", help="a row's label and unit folder; the first is the baseline")
    parser.add_argument("--json", type=Path, help="also write the table's numbers here")
    parser.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples (default %(default)s)")
    args = parser.parse_args(argv)
    rows = []
    for item in args.rows:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            parser.error(f"a row is LABEL=UNIT_FOLDER, got {item!r}")
        rows.append((label, Path(folder)))
    try:
        table = table2(rows, args.bootstrap)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if args.json is not None:
        args.json.write_text(json.dumps(table, indent=2) + "\n")
    print(table2_markdown(table), end="")


if __name__ == "__main__":
    main()
