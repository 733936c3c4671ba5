"""Pair the no-masking checks with SupOnly and set them beside the masked checks of the same
seed and thread count. Run from the repository root; reads the unit folders beside this file (or the folder given,
e.g. runs/nomask after go.sh) and prints a Markdown table."""
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, ".")
from examples.study_stats import paired_scores, read_scores  # noqa: E402

RUNS = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent
MASKED = Path("docs/results/main-job-average-2026-12-07")


def scores(unit: Path) -> dict[str, tuple[float, float]]:
    # the snapshot runs keep the averaged model's scores beside the val-chosen ones
    averaged = unit / "average_test_scores.csv"
    return read_scores(averaged if averaged.exists() else unit / "test_scores.csv")


def paired(sup: dict, csc: dict) -> dict:
    assert set(sup) == set(csc), "both methods are scored on the same test images"
    return {"sup": np.mean([v[0] for v in sup.values()]), "csc": np.mean([v[0] for v in csc.values()]),
            **paired_scores(sup, csc, 10_000)}


print("| seed | threads | SupOnly | CSC-PA, no masking | paired [95% CI] | Wilcoxon p | better / worse / tied | masked job, same seed and threads |")
print("|---|---|---|---|---|---|---|---|")
for run in sorted(RUNS.glob("s*-*t")):
    if not (run / "cscpa/fold0/test_scores.csv").exists():
        continue
    seed, threads = run.name[1:].split("-")
    masked = MASKED / run.name
    sup_unit = run / "suponly/fold0" if (run / "suponly/fold0/test_scores.csv").exists() else masked / "suponly/fold0"
    if not sup_unit.exists():
        print(f"| {seed} | {threads[:-1]} | no SupOnly run to pair with | | | | | |")
        continue
    sup = scores(sup_unit)
    if sup_unit.parent.parent == run:  # SupOnly retrained: does it reproduce the masked job's SupOnly?
        same = not masked.exists() or scores(masked / "suponly/fold0") == sup
        sup_note = "" if same else " (differs from the masked job's SupOnly)"
    else:
        sup_note = " (masked job's)"
    p = paired(sup, scores(run / "cscpa/fold0"))
    m = paired(scores(masked / "suponly/fold0"), scores(masked / "cscpa/fold0")) if masked.exists() else None
    ci = p["ci95"]
    masked_text = "not run" if m is None else f"{100 * m['mean_diff_dice']:+.2f}"
    print(f"| {seed} | {threads[:-1]} | {100 * p['sup']:.2f}{sup_note} | {100 * p['csc']:.2f} | "
          f"{100 * p['mean_diff_dice']:+.2f} [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] | {p['wilcoxon_p']:.2g} | "
          f"{p['better']} / {p['worse']} / {p['tied']} | {masked_text} |")
