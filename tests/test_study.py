"""The paired study: units, resumption, statistics, the JSON it writes."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from examples import study
from examples.engine.arguments import config_for, parse_args

scipy_stats = pytest.importorskip("scipy.stats")

TINY = [
    "--preset", "paper", "--backbone", "resnet18", "--output-stride", "16", "--no-pretrained", "--crop", "64",
    "--epochs", "2", "--pretrain-epochs", "1", "--iters-per-epoch", "1", "--workers", "0",
    "--phantom-images", "30", "--batch", "2", "--overlays", "0",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    out = tmp_path_factory.mktemp("study")
    argv = ["--data", "phantom", "--folds", "0,1", "--out", str(out), "--json", str(out / "copy.json"),
            "--bootstrap", "500", *TINY]
    assert study.main(argv) == 0
    yield out
    shutil.rmtree(out, ignore_errors=True)  # ~800 MB of checkpoints; CI's disk is not ours alone


@pytest.mark.slow
def test_study_writes_the_promised_json(finished: Path) -> None:
    document = json.loads((finished / "copy.json").read_text())
    assert document == json.loads((finished / "study.json").read_text())
    assert [(f["fold"], f["method"]) for f in document["folds"]] == [
        (0, "suponly"), (0, "cscpa"), (1, "suponly"), (1, "cscpa")]
    for row in document["folds"]:
        assert 0.0 <= row["dice"] <= 1.0 and 0.0 <= row["iou"] <= 1.0
    paired = document["paired"]
    assert set(paired) >= {"mean_diff_dice", "ci95", "wilcoxon_p"}
    assert paired["folds"] == [0, 1] and paired["images"] > 0
    assert paired["better"] + paired["worse"] + paired["tied"] == paired["images"]
    assert document["config"]["cscpa"]["method"] == "cscpa" and len(document["git_sha"]) >= 7
    assert document["units_finished"] == document["units_total"] == 4
    assert len(document["per_image"]) == paired["images"]
    for stem in (finished / "study", finished / "copy"):
        for suffix in ("-per-image.png", "-differences.png"):
            png = stem.with_name(stem.name + suffix).read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, suffix
    # the paired mean is the mean over images of the per-image differences in the units' CSVs
    diffs = []
    for fold in (0, 1):
        a = study.read_scores(finished / "suponly" / f"fold{fold}" / "test_scores.csv")
        b = study.read_scores(finished / "cscpa" / f"fold{fold}" / "test_scores.csv")
        diffs += [b[k][0] - a[k][0] for k in sorted(a)]
    assert paired["mean_diff_dice"] == pytest.approx(float(np.mean(diffs)), abs=1e-12)


@pytest.mark.slow
def test_finished_units_are_not_retrained(finished: Path, capsys: pytest.CaptureFixture[str]) -> None:
    stamp = (finished / "cscpa" / "fold1" / "results.json").stat().st_mtime_ns
    argv = ["--data", "phantom", "--folds", "0,1", "--out", str(finished), "--bootstrap", "500", *TINY]
    assert study.main(argv) == 0
    assert (finished / "cscpa" / "fold1" / "results.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out.count("finished earlier, not retrained") == 4


@pytest.mark.slow
def test_a_finished_unit_with_other_settings_is_refused(finished: Path) -> None:
    argv = ["--data", "phantom", "--folds", "0", "--out", str(finished), *TINY, "--lr", "0.5"]
    with pytest.raises(SystemExit, match="trained with lr=0.003, this study asks for lr=0.5"):
        study.main(argv)


@pytest.mark.slow
def test_an_interrupted_unit_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = study.train
    calls: list[list[str]] = []

    def stop_after_the_first_unit(argv: list[str]) -> int:
        calls.append(argv)
        if len(calls) == 2:
            raise SystemExit("stopped by signal 15 (test)")
        return real(argv)

    monkeypatch.setattr(study, "train", stop_after_the_first_unit)
    argv = ["--data", "phantom", "--folds", "0", "--out", str(tmp_path), "--bootstrap", "100", *TINY]
    with pytest.raises(SystemExit, match="signal 15"):
        study.main(argv)
    partial = json.loads((tmp_path / "study.json").read_text())
    assert partial["units_finished"] == 1 and partial["paired"]["images"] == 0  # committed as it came
    assert study.main(argv) == 0
    assert [c[c.index("--method") + 1] for c in calls] == ["suponly", "cscpa", "cscpa"]
    assert all("--resume" in c for c in calls)


def test_own_flags_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        study.parse_args(["--data", "phantom", "--out", "x", "--method", "cscpa"])
    assert "--method is set by the study itself" in capsys.readouterr().err


def test_cpu_preset_is_the_default_and_can_be_replaced() -> None:
    _, rest = study.parse_args(["--data", "phantom", "--out", "x", "--epochs", "3"])
    assert rest[:2] == ["--preset", "cpu"]
    _, rest = study.parse_args(["--data", "phantom", "--out", "x", "--preset", "paper"])
    assert rest == ["--preset", "paper"]


def test_statistics_against_scipy_and_by_hand() -> None:
    rng = np.random.default_rng(3)
    diffs = rng.normal(0.05, 0.2, size=200)
    diffs[:10] = 0.0  # ties are dropped
    assert study.wilcoxon_p(diffs) == pytest.approx(scipy_stats.wilcoxon(diffs[10:]).pvalue, rel=1e-12)
    low, high = study.bootstrap_ci(diffs, 4000)
    se = diffs.std(ddof=1) / np.sqrt(diffs.size)
    # the percentile interval of the mean is close to the normal one, mean ± 1.96 SE
    assert low == pytest.approx(diffs.mean() - 1.96 * se, abs=0.2 * se)
    assert high == pytest.approx(diffs.mean() + 1.96 * se, abs=0.2 * se)
    assert study.bootstrap_ci(diffs, 4000) == (low, high)  # seeded
    assert np.isnan(study.wilcoxon_p(np.zeros(5)))
    assert all(np.isnan(study.bootstrap_ci(np.zeros(0), 10)))


@pytest.mark.slow
def test_methods_side_by_side_and_cscpa_settings_leave_suponly_units_valid(tmp_path: Path) -> None:
    base = ["--data", "phantom", "--folds", "0", "--out", str(tmp_path), "--bootstrap", "100", *TINY]
    assert study.main([*base, "--methods", "suponly"]) == 0
    assert not (tmp_path / "cscpa").exists()
    partial = json.loads((tmp_path / "study.json").read_text())
    assert partial["units_finished"] == 1 and partial["units_total"] == 2
    # another tau changes nothing SupOnly computes: its unit stays, CSC-PA trains
    assert study.main([*base, "--threshold", "0.9"]) == 0
    document = json.loads((tmp_path / "study.json").read_text())
    assert document["units_finished"] == 2 and document["config"]["cscpa"]["threshold"] == 0.9
    with pytest.raises(SystemExit):
        study.parse_args([*base, "--methods", "fixmatch"])


def test_a_unit_held_by_a_live_process_is_skipped_and_a_stale_lock_is_taken(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    unit = tmp_path / "cscpa" / "fold0"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        unit.mkdir(parents=True)
        (unit / ".study-lock").write_text(str(sleeper.pid))
        assert study.claim(unit) is None  # a live holder
    finally:
        sleeper.kill()
        sleeper.wait()
    lock = study.claim(unit)  # its process is gone: the lock is ours now
    assert lock is not None and lock.read_text() == str(os.getpid())
    assert study.claim(unit) is not None  # our own lock does not block us


@pytest.mark.slow
def test_report_trains_nothing_and_a_copied_split_is_the_same_split(finished: Path, tmp_path: Path) -> None:
    stamp = (finished / "study.json").stat().st_mtime_ns
    copy = tmp_path / "same-split.json"
    copy.write_bytes((finished / "splits.json").read_bytes())
    argv = ["--data", "phantom", "--folds", "0,1", "--out", str(finished), "--split", str(copy), "--bootstrap", "100",
            "--report", *TINY]
    assert study.main(argv) == 0
    assert (finished / "study.json").stat().st_mtime_ns > stamp
    assert json.loads((finished / "study.json").read_text())["units_finished"] == 4
    assert study._same_file_content(copy, finished / "splits.json")
    assert not study._same_file_content(copy, tmp_path / "missing.json")


@pytest.mark.slow
def test_a_study_restored_from_its_committed_results_reports_without_checkpoints(finished: Path, tmp_path: Path) -> None:
    """A fresh checkout has the units' results.json and test_scores.csv (committed) but no
    checkpoints: the study counts the units as finished and still writes its summary."""
    import shutil

    restored = tmp_path / "restored"
    for unit in finished.glob("*/fold*"):
        target = restored / unit.parent.name / unit.name
        target.mkdir(parents=True)
        for name in ("results.json", "test_scores.csv"):
            shutil.copyfile(unit / name, target / name)
    shutil.copyfile(finished / "splits.json", restored / "splits.json")
    argv = ["--data", "phantom", "--folds", "0,1", "--out", str(restored), "--split", str(finished / "splits.json"),
            "--bootstrap", "100", *TINY]
    assert study.main(argv) == 0  # nothing retrained: every unit has its results
    document = json.loads((restored / "study.json").read_text())
    assert document["units_finished"] == 4
    assert document["paired"] == json.loads((finished / "study.json").read_text())["paired"] | {
        "ci95": document["paired"]["ci95"]}  # the CI is from fewer resamples here
    assert (restored / "study-per-image.png").exists() and not (restored / "study-differences.png").exists()


# --- several labeled fractions (the paper's Table 1) and UDIAT ----------------------------------

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "docs" / "results" / "busi-dev-1of8-units"


def _fake_train(argv: list[str]) -> int:
    """What train_busi.main leaves in a unit folder (results.json, test_scores.csv), without training:
    each test image scores a made-up Dice that depends on the fraction, the method and the image."""
    import csv
    import dataclasses
    import zlib

    from examples.data.splits import load_split

    args = parse_args(argv)
    fold = int(args.fold)
    config = config_for(args, args.method, fold)
    unit = Path(args.out) / args.method / f"fold{fold}"
    unit.mkdir(parents=True, exist_ok=True)
    base = {"1/8": 0.40, "1/4": 0.50, "1/2": 0.60}[args.labeled] + (0.05 if args.method == "cscpa" else 0.0)
    rows = []
    for image in load_split(Path(args.split), fold, args.labeled).test:
        noise = zlib.crc32(f"{args.labeled}{args.method}{image}".encode()) % 1000 / 10_000  # [0, 0.1)
        rows.append((image, base + noise, (base + noise) / 1.5))
    with open(unit / "test_scores.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "dice", "iou"])
        writer.writerows(rows)
    dice, iou = float(np.mean([r[1] for r in rows])), float(np.mean([r[2] for r in rows]))
    (unit / "results.json").write_text(json.dumps({
        "config": dataclasses.asdict(config), "test": {"dice": dice, "iou": iou, "images": len(rows)},
        "selected_epoch": 1, "best_val_dice": 0.5, "seconds": 1.0, "git_sha": "fake"}))
    return 0


@pytest.fixture()
def udiat(tmp_path: Path) -> Path:
    from tests._data_trees import make_udiat_tree

    root = tmp_path / "UDIAT_Dataset_B"
    make_udiat_tree(root, count=40, size=(24, 32))
    return root


def test_several_fractions_on_udiat_make_table1(udiat: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[list[str]] = []
    monkeypatch.setattr(study, "train", lambda argv: calls.append(argv) or _fake_train(argv))
    out = tmp_path / "study"
    argv = ["--data", str(udiat), "--folds", "0,1", "--labeled", "1/4,1/8", "--out", str(out), "--bootstrap", "200",
            "--no-figures", "--json", str(tmp_path / "copy.json")]
    assert study.main(argv) == 0
    printed = capsys.readouterr().out
    assert "ImageMaskFolder" in printed and "original/ + GT/" in printed  # UDIAT's layout was detected
    assert "unit 1/8: fold 0 SupOnly, 1/4 labeled" in printed  # the order given on the command line
    # each (fraction, fold, method) is a unit in --out/<fraction>/<method>/fold<k>/
    for tag, fraction in (("1of8", "1/8"), ("1of4", "1/4")):
        for method in study.METHODS:
            for fold in (0, 1):
                saved = json.loads((out / tag / method / f"fold{fold}" / "results.json").read_text())
                assert saved["config"]["labeled"] == fraction
    assert not (out / "suponly").exists()
    document = json.loads((out / "study.json").read_text())
    assert document == json.loads((tmp_path / "copy.json").read_text())
    assert document["units_finished"] == document["units_total"] == 8
    assert document["study"]["fractions"] == ["1/4", "1/8"] and "original/ + GT/" in document["study"]["dataset"]
    assert set(document["fractions"]) == {"1/8", "1/4"}
    table = document["table1"]
    assert table["fractions"] == ["1/8", "1/4"] and table["folds"] == 2  # the paper's column order
    for fraction, entry in document["fractions"].items():
        assert entry["directory"] == fraction.replace("/", "of") and entry["units_finished"] == 4
        assert entry["config"]["cscpa"]["labeled"] == fraction
        for row in table["rows"]:
            cell = row["cells"][fraction]
            dice = [f["dice"] for f in entry["folds"] if f["method"] == row["method"]]
            assert cell["folds"] == 2 and cell["dice_mean"] == pytest.approx(np.mean(dice), abs=1e-12)
            assert cell["dice_std"] == pytest.approx(np.std(dice), abs=1e-12)
        assert table["paired"][fraction]["images"] == entry["paired"]["images"] > 0
        assert table["paired"][fraction]["mean_diff_dice"] == entry["paired"]["mean_diff_dice"]
    # the fake scores: 1/4 is 10 points above 1/8, CSC-PA 5 above SupOnly, up to 10 points of noise
    cells = {(r["method"], f): c for r in table["rows"] for f, c in r["cells"].items()}
    assert 0.0 < cells[("suponly", "1/4")]["dice_mean"] - cells[("suponly", "1/8")]["dice_mean"] < 0.2
    markdown = (out / "study.md").read_text()
    assert "| method | 1/8 labeled | 1/4 labeled |" in markdown
    sup = cells[("suponly", "1/8")]
    assert (f"| SupOnly | {100 * sup['dice_mean']:.2f} ± {100 * sup['dice_std']:.2f}, "
            f"{100 * sup['iou_mean']:.2f} ± {100 * sup['iou_std']:.2f} |") in markdown
    assert "### 1/8 labeled (1of8/)" in markdown and "### 1/4 labeled (1of4/)" in markdown
    assert markdown.strip() in printed
    # resumable: nothing is trained again; another setting is refused for the unit it concerns
    assert study.main(argv) == 0 and len(calls) == 8
    assert capsys.readouterr().out.count("finished earlier, not retrained") == 8
    with pytest.raises(SystemExit, match="1of4/suponly/fold0 was trained with lr=0.01, this study asks for lr=0.5"):
        study.main([*argv, "--lr", "0.5"])
    # a single-fraction study may not be mixed into this --out, nor this one into a single-fraction --out
    with pytest.raises(SystemExit, match="holds a study of several fractions"):
        study.main([*argv[:4], "--labeled", "1/8", *argv[6:]])
    (out / "1of2").mkdir()
    flat = tmp_path / "flat"
    assert study.main(["--data", str(udiat), "--folds", "0", "--out", str(flat), "--no-figures"]) == 0
    with pytest.raises(SystemExit, match=r"single-fraction study \(suponly/, cscpa/ at 1/8 labeled\).*mkdir .*1of8 && mv"):
        study.main(["--data", str(udiat), "--folds", "0", "--labeled", "1/8,1/2", "--out", str(flat), "--no-figures"])


def test_bad_fraction_lists_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    for labeled in ("1/3", "", "1/8,1/16"):
        with pytest.raises(SystemExit):
            study.parse_args(["--data", "phantom", "--out", "x", "--labeled", labeled])
        assert "--labeled must list some of 1/8, 1/4, 1/2" in capsys.readouterr().err
    args, _ = study.parse_args(["--data", "phantom", "--out", "x", "--labeled", "1/2, 1/8,1/2"])
    assert args.fractions == ["1/2", "1/8"] and args.labeled == "1/2, 1/8,1/2"
    assert study.parse_args(["--data", "phantom", "--out", "x"])[0].fractions == ["1/8"]


def test_table1_module_examples() -> None:
    import doctest

    from examples import study_table1

    result = doctest.testmod(study_table1, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_the_committed_single_fraction_study_reads_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The busi-dev 1/8 study (a single fraction) keeps its layout, its JSON and its settings check:
    its committed units summarise to the committed JSON, and every unit passes check_same_settings
    under the study's own command (runs/STUDY_ARGS)."""
    committed = json.loads((ROOT / "docs" / "results" / "busi-dev-1of8.json").read_text())
    if not UNITS.is_dir():
        pytest.skip("no committed busi-dev units")
    monkeypatch.chdir(ROOT)  # the units' config.split is relative to the repository
    args, rest = study.parse_args(["--data", "../shared/data/busi-dev", "--split", "docs/results/busi-dev-splits.json",
                                   "--folds", "all", "--labeled", "1/8", "--out", str(tmp_path)])
    shutil_copytree(UNITS, tmp_path)
    units = [study.Unit(fold, method, "1/8") for fold in range(5) for method in study.METHODS]
    finished = [u for u in units if (u.directory(tmp_path) / "results.json").exists()]
    assert len(finished) == committed["units_finished"]
    summary = study.summarise(tmp_path, units, 10_000)
    for key in ("folds", "methods", "paired", "per_image"):
        assert summary[key] == committed[key], key
    split = Path("docs/results/busi-dev-splits.json")
    for unit in finished:
        assert unit.directory(tmp_path) == tmp_path / unit.method / f"fold{unit.fold}"
        assert study.train_argv(args, rest, unit, split)[-5:] == ["--fold", str(unit.fold), "--out", str(tmp_path), "--resume"]
        study.check_same_settings(unit, tmp_path, args, rest, split)
    study.check_layout(tmp_path, multi=False)


def shutil_copytree(source: Path, target: Path) -> None:
    import shutil

    shutil.copytree(source, target, dirs_exist_ok=True)


@pytest.mark.slow
def test_a_two_fraction_study_trains_end_to_end_on_a_udiat_tree(udiat: Path, tmp_path: Path) -> None:
    out = tmp_path / "study"
    argv = ["--data", str(udiat), "--folds", "0", "--labeled", "1/8,1/4", "--out", str(out), "--bootstrap", "100", *TINY]
    assert study.main(argv) == 0
    document = json.loads((out / "study.json").read_text())
    assert document["units_finished"] == 4 and document["table1"]["fractions"] == ["1/8", "1/4"]
    for tag in ("1of8", "1of4"):
        assert (out / tag / "cscpa" / "fold0" / "best.pt").exists()
        for suffix in ("-per-image.png", "-differences.png"):
            png = (out / f"study-{tag}{suffix}").read_bytes()
            assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000, (tag, suffix)
    for fraction, entry in document["fractions"].items():
        assert entry["paired"]["images"] == len(entry["per_image"]) > 0
        assert all(0.0 <= f["dice"] <= 1.0 for f in entry["folds"])
