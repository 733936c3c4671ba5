"""The paired study: units, resumption, statistics, the JSON it writes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from examples import study, train_busi

scipy_stats = pytest.importorskip("scipy.stats")

TINY = [
    "--preset", "paper", "--backbone", "resnet18", "--output-stride", "16", "--no-pretrained", "--crop", "64",
    "--epochs", "2", "--pretrain-epochs", "1", "--iters-per-epoch", "1", "--workers", "0",
    "--phantom-images", "30", "--batch", "2", "--overlays", "0",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("study")
    argv = ["--data", "phantom", "--folds", "0,1", "--out", str(out), "--json", str(out / "copy.json"),
            "--bootstrap", "500", *TINY]
    assert study.main(argv) == 0
    return out


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
    real = train_busi.main
    calls: list[list[str]] = []

    def stop_after_the_first_unit(argv: list[str]) -> int:
        calls.append(argv)
        if len(calls) == 2:
            raise SystemExit("stopped by signal 15 (test)")
        return real(argv)

    monkeypatch.setattr(train_busi, "main", stop_after_the_first_unit)
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
