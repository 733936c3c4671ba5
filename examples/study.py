"""A paired study: SupOnly and CSC-PA trained on the same folds, compared image by image.

    python -m examples.study --data ../shared/data/busi-dev --folds all --labeled 1/8 \\
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

Several labeled fractions, the paper's Table 1 (``examples/study_table1.py``)::

    python -m examples.study --data /path/to/UDIAT_Dataset_B --folds all --labeled 1/8,1/4,1/2 \\
        --out runs/study-udiat

Each (fraction, fold, method) is then a unit in ``--out/<1of8|1of4|1of2>/<method>/fold<k>/``,
all on the one split (its labeled sets are nested), and the report leads with Table 1: rows
the methods, columns the fractions, cells Dice % ± std and IoU % ± std over folds, then the
paired statistics per fraction, then each fraction's tables as above. With one fraction the
layout, the JSON and the report are the single-fraction ones above (plus a ``table1`` key).
``--data`` is any folder train_busi.py reads (detected by ``examples.data.registry.build_dataset``):
BUSI, UDIAT's Dataset B (``original/`` + ``GT/``), images/ + masks/, or ``phantom``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import argparse
import dataclasses
import json
import shutil
import time
from typing import Any, Sequence

from examples.data.folds import open_dataset, split_file
from examples.engine.arguments import config_for, parse_args as parse_train_args
from examples.engine.run import main as train
from examples.study_table1 import FRACTIONS, fraction_tag, table1, table1_markdown
from examples.engine.distributed import git_sha
# bootstrap_ci, read_scores and wilcoxon_p are part of the study's API (tests use study.NAME)
from examples.study_stats import bootstrap_ci, read_scores, summarise, table, wilcoxon_p  # noqa: F401
from examples.study_units import METHODS, Unit, claim

_OWN = ("--method", "--fold", "--folds", "--resume", "--out", "--labeled", "--data", "--split")


# Settings that do not change what a unit computes, and those SupOnly never reads: a change of
# tau, say, leaves the finished SupOnly units valid.
_NOT_COMPARED = ("resume", "out", "workers", "device", "stop_after", "overlays", "save_every")
_CSCPA_ONLY = ("fpa", "epa", "pal", "masking", "threshold", "lesion_threshold", "unsup_weight", "unsup_rampup",
               "reliability", "patch_size", "mask_ratio", "keep_hard", "fpa_eval", "epa_gate", "fpa_kv_stride",
               "pretrain_epochs")


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    # no abbreviations: --method (train_busi's) must not pass for --methods (ours)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", required=True,
                   help="dataset folder, as for train_busi.py and detected by its layout: BUSI (benign/ malignant/), "
                        "UDIAT Dataset B (original/ + GT/), images/ + masks/; or 'phantom'")
    p.add_argument("--split", default=None, help="split file (default: made once in --out/splits.json)")
    p.add_argument("--folds", default="all", help="'all' or a comma-separated list of fold indices (default %(default)s)")
    p.add_argument("--labeled", default="1/8",
                   help=f"labeled fraction, or several comma-separated ({','.join(FRACTIONS)}: the paper's Table 1); "
                        "with several, units go to --out/<1of8|1of4|1of2>/<method>/fold<k>/ (default %(default)s)")
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
    fractions = list(dict.fromkeys(f.strip() for f in args.labeled.split(",") if f.strip()))
    if not fractions or any(f not in FRACTIONS for f in fractions):
        p.error(f"--labeled must list some of {', '.join(FRACTIONS)}, comma-separated, got {args.labeled!r}")
    args.fractions = fractions  # in the order given: the order the units train in
    for flag in rest:
        if flag.split("=")[0] in _OWN:
            p.error(f"{flag} is set by the study itself; remove it")
    if "--preset" not in " ".join(rest):
        rest = ["--preset", "cpu", *rest]
    return args, rest


def train_argv(args: argparse.Namespace, rest: list[str], unit: Unit, split: Path) -> list[str]:
    out = str(unit.root(Path(args.out))) if unit.subdir else args.out
    return [*rest, "--data", args.data, "--split", str(split), "--labeled", unit.labeled, "--method", unit.method,
            "--fold", str(unit.fold), "--out", out, "--resume"]


def check_same_settings(unit: Unit, out: Path, args: argparse.Namespace, rest: list[str], split: Path) -> None:
    """A finished unit counts only if it was trained with the settings this study asks for."""
    unit_args = parse_train_args(train_argv(args, rest, unit, split))
    wanted = dataclasses.asdict(config_for(unit_args, unit.method, unit.fold))
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


def main(argv: Sequence[str] | None = None) -> int:
    args, rest = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # train_busi validates the pass-through flags once, before any training
    probe = config_for(parse_train_args([*rest, "--data", args.data, "--out", args.out]), "cscpa", 0)
    dataset = open_dataset(probe)
    split = split_file(dataclasses.replace(probe, split=args.split), True)
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
    multi = len(args.fractions) > 1
    units = [Unit(fold, method, fraction, fraction_tag(fraction) if multi else "")
             for fraction in args.fractions for fold in folds for method in METHODS]
    check_layout(out, multi)
    todo = [] if args.report else [unit for unit in units if unit.method in args.methods]
    started = time.perf_counter()
    print(f"[study] data {args.data}: {dataset!r}; split {split}", flush=True)
    record = {"command": ["python", "-m", "examples.study", *(argv if argv is not None else sys.argv[1:])], "train_args": rest,
              "labeled": args.labeled, "data": args.data, "split": str(split), "fractions": args.fractions,
              "dataset": repr(dataset)}
    for number, unit in enumerate(todo, 1):
        label = unit.label(number, len(todo))
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
            status = train(train_argv(args, rest, unit, split))
        finally:
            lock.unlink(missing_ok=True)
        if status:
            return status
        result = json.loads((unit.directory(out) / "results.json").read_text())
        print(f"{label}: done in {(time.perf_counter() - t0) / 60:.1f} min this session "
              f"({result['seconds'] / 60:.1f} min in its last run); test Dice {100 * result['test']['dice']:.2f}", flush=True)
        write(out, args, units, record)
    document, report = write(out, args, units, record)
    print(f"\n[study] {document['units_finished']}/{len(units)} units finished "
          f"({(time.perf_counter() - started) / 60:.1f} min this session)\n\n" + report, flush=True)
    return 0


def check_layout(out: Path, multi: bool) -> None:
    """Refuse an --out that holds the other layout, rather than train its units again beside it."""
    flat = [m for m in METHODS if (out / m).is_dir()]
    nested = [fraction_tag(f) for f in FRACTIONS if (out / fraction_tag(f)).is_dir()]
    if multi and flat:
        found = [json.loads(r.read_text())["config"].get("labeled") for m in flat for r in (out / m).glob("fold*/results.json")]
        labeled = found[0] if found and len(set(found)) == 1 else None
        move = "move its units into the fraction's folder"
        if labeled in FRACTIONS:
            target = out / fraction_tag(labeled)
            move = f"move them with `mkdir {target} && mv {' '.join(str(out / m) for m in flat)} {target}/`"
        raise SystemExit(f"{out} holds a single-fraction study ({', '.join(m + '/' for m in flat)} at {labeled or '?'} "
                         f"labeled) and a study of several fractions keeps each fraction in its own folder: {move}, "
                         "or use another --out")
    if not multi and nested:
        raise SystemExit(f"{out} holds a study of several fractions ({', '.join(n + '/' for n in nested)}): give the same "
                         "--labeled list, or use another --out")


def _configs(out: Path, units: list[Unit]) -> dict[str, Any]:
    """Per method, the configuration of its first finished unit."""
    configs = {}
    for method in METHODS:
        first = next((u for u in units if u.method == method and (u.directory(out) / "results.json").exists()), None)
        if first is not None:
            configs[method] = json.loads((first.directory(out) / "results.json").read_text())["config"]
    return configs


def write(out: Path, args: argparse.Namespace, units: list[Unit], record: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Write study.json, study.md, the --json copy and the figures; return the document and the report.

    One fraction: today's document (folds, methods, paired, per_image, ...) plus ``table1``.
    Several: ``fractions`` holds that document per fraction, beside ``table1``."""
    fractions = list(dict.fromkeys(u.labeled for u in units))
    mine = {f: [u for u in units if u.labeled == f] for f in fractions}
    summaries = {f: summarise(out, mine[f], args.bootstrap) for f in fractions}
    layout = table1(summaries, len({u.fold for u in units}))
    finished = sum(len(s["folds"]) for s in summaries.values())
    if len(fractions) == 1:
        summary = summaries[fractions[0]]
        document = {**summary, "study": record, "config": _configs(out, units), "git_sha": git_sha(),
                    "units_finished": finished, "units_total": len(units), "table1": layout}
        report = table(summary)
    else:
        document = {
            "fractions": {f: {**summaries[f], "directory": mine[f][0].subdir, "config": _configs(out, mine[f]),
                              "units_finished": len(summaries[f]["folds"]), "units_total": len(mine[f])}
                          for f in fractions},
            "table1": layout, "study": record, "git_sha": git_sha(), "units_finished": finished, "units_total": len(units),
        }
        report = "\n\n".join([table1_markdown(layout)] + [
            f"### {f} labeled ({mine[f][0].subdir}/)\n\n{table(summaries[f])}" for f in layout["fractions"]])
    text = json.dumps(document, indent=2) + "\n"
    (out / "study.json").write_text(text)
    (out / "study.md").write_text(report + "\n")
    targets = [out / "study"]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
        targets.append(Path(args.json).with_suffix(""))
    if args.figures:
        for f in fractions:
            # several fractions: study-1of8-per-image.png, ... (and the same beside --json)
            tag = f"-{mine[f][0].subdir}" if mine[f][0].subdir else ""
            if summaries[f]["per_image"]:
                figures(mine[f][0].root(out), summaries[f], [t.with_name(t.name + tag) for t in targets])
    return document, report


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
