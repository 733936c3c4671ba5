"""A paired study: SupOnly and CSC-PA trained on the same folds, compared image by image.

    python examples/study.py --data ../shared/data/busi-dev --folds all --labeled 1/8 \\
        --out runs/study-busi-dev-1of8 --json docs/results/busi-dev-1of8.json

Every (fold, method) pair is one unit, trained by ``examples/train_busi.py`` into
``--out/<method>/fold<k>/``. Units are resumable: a unit whose ``results.json`` exists is not
retrained, and an interrupted one continues from its ``last.pt`` (Ctrl-C or SIGTERM saves it).
Run the same command again to continue a study. A progress line says which unit runs, and how
long each took. Several study processes may share one ``--out`` (for example one per core with
``OMP_NUM_THREADS=1``): a lock file per unit keeps them on different units.

Arguments that the study does not know go to ``train_busi.py`` unchanged (``--backbone``,
``--epochs``, ...); the default is ``--preset cpu``, the protocol sized for a 2-core CPU
(docs/training.md). ``--method``, ``--fold`` and ``--resume`` are the study's own business.

After every unit the study prints and writes (``--json``, default ``--out/study.json``):

- per fold and method, test Dice and IoU (means over the fold's test images, fractions in [0, 1]);
- per method, mean ± std over folds (the paper's table);
- the paired CSC-PA − SupOnly Dice difference over all test images of all finished folds, with
  a 95% bootstrap confidence interval (10 000 resamples of the images) and the two-sided
  Wilcoxon signed-rank p-value (images where both methods score the same are dropped, the
  test's usual convention).
"""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = _ROOT
elif _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import argparse  # noqa: E402
import csv  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from examples import train_busi  # noqa: E402
from examples.trainer import git_sha  # noqa: E402

METHODS = ("suponly", "cscpa")
NAMES = {"suponly": "SupOnly", "cscpa": "CSC-PA"}
_OWN = ("--method", "--fold", "--folds", "--resume", "--out", "--labeled", "--data", "--split")


# Settings that do not change what a unit computes, and those SupOnly never reads: a change of
# tau, say, leaves the finished SupOnly units valid.
_NOT_COMPARED = ("resume", "out", "workers", "device", "stop_after", "overlays", "save_every")
_CSCPA_ONLY = ("fpa", "epa", "pal", "masking", "threshold", "unsup_weight", "reliability", "patch_size", "mask_ratio",
               "keep_hard", "fpa_eval", "epa_gate", "pretrain_epochs")


@dataclass(frozen=True)
class Unit:
    fold: int
    method: str

    def directory(self, out: Path) -> Path:
        return out / self.method / f"fold{self.fold}"


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    # no abbreviations: --method (train_busi's) must not pass for --methods (ours)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", required=True, help="dataset folder (or 'phantom'), as for train_busi.py")
    p.add_argument("--split", default=None, help="split file (default: made once in --out/splits.json)")
    p.add_argument("--folds", default="all", help="'all' or a comma-separated list of fold indices (default %(default)s)")
    p.add_argument("--labeled", default="1/8", choices=["1/2", "1/4", "1/8"], help="labeled fraction (default %(default)s)")
    p.add_argument("--methods", default="suponly,cscpa",
                   help="the methods to train now, comma-separated; the summary always covers every finished unit, so "
                        "two processes can train the two methods side by side into the same --out (default %(default)s)")
    p.add_argument("--out", required=True, help="study folder: one sub-folder per method and fold")
    p.add_argument("--json", default=None, help="write the study's JSON here too (default: only --out/study.json)")
    p.add_argument("--no-figures", dest="figures", action="store_false",
                   help="skip the per-image scatter plot and the grid of the largest differences (written next to "
                        "study.json and --json after every unit once a fold has both methods)")
    p.add_argument("--report", action="store_true",
                   help="train nothing: write study.json, study.md and the figures from the units finished so far")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap resamples for the CI (default %(default)s)")
    args, rest = p.parse_known_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    if not methods or any(m not in METHODS for m in methods):
        p.error(f"--methods must list some of {', '.join(METHODS)}, got {args.methods!r}")
    args.methods = [m for m in METHODS if m in methods]
    for flag in rest:
        if flag.split("=")[0] in _OWN:
            p.error(f"{flag} is set by the study itself; remove it")
    if "--preset" not in " ".join(rest):
        rest = ["--preset", "cpu", *rest]
    return args, rest


def train_argv(args: argparse.Namespace, rest: list[str], unit: Unit, split: Path) -> list[str]:
    return [*rest, "--data", args.data, "--split", str(split), "--labeled", args.labeled, "--method", unit.method,
            "--fold", str(unit.fold), "--out", args.out, "--resume"]


def claim(unit_dir: Path) -> Path | None:
    """Take the unit's lock file (``.study-lock`` holding our pid), or None when a live process
    holds it. Several study processes can then share one --out: each trains the units no other
    one is on. A lock left by a process that died is taken over."""
    unit_dir.mkdir(parents=True, exist_ok=True)
    lock = unit_dir / ".study-lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                return None
            lock.unlink(missing_ok=True)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return lock
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def check_same_settings(unit: Unit, out: Path, args: argparse.Namespace, rest: list[str], split: Path) -> None:
    """A finished unit counts only if it was trained with the settings this study asks for."""
    unit_args = train_busi.parse_args(train_argv(args, rest, unit, split))
    wanted = dataclasses.asdict(train_busi.config_for(unit_args, unit.method, unit.fold))
    saved = json.loads((unit.directory(out) / "results.json").read_text())["config"]
    for key, value in wanted.items():
        if key in _NOT_COMPARED or key not in saved or (unit.method == "suponly" and key in _CSCPA_ONLY):
            continue
        if key == "split" and _same_file_content(saved[key], value):
            continue  # the same split, copied or moved
        if saved[key] != value:
            raise SystemExit(
                f"{unit.directory(out)} was trained with {key}={saved[key]!r}, this study asks for {key}={value!r}; "
                "use another --out, or the settings of the study that made it"
            )


def _same_file_content(a: Any, b: Any) -> bool:
    try:
        return a is not None and b is not None and Path(a).read_bytes() == Path(b).read_bytes()
    except OSError:
        return False


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
    d = np.array(diffs)
    low, high = bootstrap_ci(d, resamples)
    paired = {
        "folds": paired_folds,
        "images": int(d.size),
        "mean_diff_dice": float(d.mean()) if d.size else float("nan"),
        "mean_diff_iou": float(np.mean(iou_diffs)) if iou_diffs else float("nan"),
        "ci95": [low, high],
        "wilcoxon_p": wilcoxon_p(d),
        "better": int((d > 0).sum()),
        "worse": int((d < 0).sum()),
        "tied": int((d == 0).sum()),
    }
    return {"folds": folds, "methods": methods, "paired": paired, "per_image": image_rows}


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


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # train_busi validates the pass-through flags once, before any training
    probe = train_busi.parse_args([*rest, "--data", args.data, "--out", args.out])
    dataset = train_busi.open_dataset(probe)
    split = train_busi.split_file(argparse.Namespace(**{**vars(probe), "split": args.split}), dataset, True)
    with open(split, encoding="utf-8") as handle:
        fold_count = len(json.load(handle)["folds"])
    if args.folds == "all":
        folds = list(range(fold_count))
    else:
        try:
            folds = [int(f) for f in args.folds.split(",")]
        except ValueError:
            raise SystemExit(f"--folds must be 'all' or comma-separated fold indices, got {args.folds!r}") from None
        if any(not 0 <= f < fold_count for f in folds):
            raise SystemExit(f"--folds must lie in [0, {fold_count - 1}] for {split}, got {args.folds}")
    units = [Unit(fold, method) for fold in folds for method in METHODS]
    todo = [] if args.report else [unit for unit in units if unit.method in args.methods]
    started = time.perf_counter()
    record = {"command": ["examples/study.py", *(argv if argv is not None else sys.argv[1:])], "train_args": rest,
              "labeled": args.labeled, "data": args.data, "split": str(split)}
    for number, unit in enumerate(todo, 1):
        label = f"[study] unit {number}/{len(todo)}: fold {unit.fold} {NAMES[unit.method]}"
        if (unit.directory(out) / "results.json").exists():
            check_same_settings(unit, out, args, rest, split)
            print(f"{label}: finished earlier, not retrained", flush=True)
            continue
        lock = claim(unit.directory(out))
        if lock is None:
            print(f"{label}: being trained by another study process, skipped", flush=True)
            continue
        resumed = (unit.directory(out) / "last.pt").exists()
        print(f"{label}: {'resuming from last.pt' if resumed else 'training'} in {unit.directory(out)}", flush=True)
        t0 = time.perf_counter()
        try:
            status = train_busi.main(train_argv(args, rest, unit, split))
        finally:
            lock.unlink(missing_ok=True)
        if status:
            return status
        result = json.loads((unit.directory(out) / "results.json").read_text())
        print(f"{label}: done in {(time.perf_counter() - t0) / 60:.1f} min this session "
              f"({result['seconds'] / 60:.1f} min in its last run); test Dice {100 * result['test']['dice']:.2f}", flush=True)
        write(out, args, units, record)
    summary = write(out, args, units, record)
    print(f"\n[study] {len(summary['folds'])}/{len(units)} units finished ({(time.perf_counter() - started) / 60:.1f} min "
          "this session)\n\n" + table(summary), flush=True)
    return 0


def write(out: Path, args: argparse.Namespace, units: list[Unit], record: dict[str, Any]) -> dict[str, Any]:
    summary = summarise(out, units, args.bootstrap)
    configs = {}
    for method in METHODS:
        first = next((u for u in units if u.method == method and (u.directory(out) / "results.json").exists()), None)
        if first is not None:
            configs[method] = json.loads((first.directory(out) / "results.json").read_text())["config"]
    document = {**summary, "study": record, "config": configs, "git_sha": git_sha(),
                "units_finished": len(summary["folds"]), "units_total": len(units)}
    text = json.dumps(document, indent=2) + "\n"
    (out / "study.json").write_text(text)
    (out / "study.md").write_text(table(summary) + "\n")
    targets = [out / "study"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
        targets.append(Path(args.json).with_suffix(""))
    if summary["per_image"] and args.figures:
        figures(out, summary, targets)
    return summary


def figures(out: Path, summary: dict[str, Any], targets: list[Path]) -> None:
    """``<target>-per-image.png`` and ``<target>-differences.png`` for each target stem."""
    from examples.study_figures import difference_grid, per_image_scatter

    pairs = [(r["fold"], r["id"], r["suponly_dice"], r["cscpa_dice"]) for r in summary["per_image"]]
    first = targets[0]
    per_image_scatter(pairs, first.with_name(first.name + "-per-image.png"))
    difference_grid(out, pairs, first.with_name(first.name + "-differences.png"))
    for target in targets[1:]:
        for suffix in ("-per-image.png", "-differences.png"):
            made = first.with_name(first.name + suffix)
            if made.exists():
                shutil.copyfile(made, target.with_name(target.name + suffix))


if __name__ == "__main__":
    sys.exit(main())
