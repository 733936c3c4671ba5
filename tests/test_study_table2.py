"""examples/study_table2.py: ablation rows paired against the baseline, from unit folders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from examples.study_table2 import main, table2, table2_markdown


def _unit(folder: Path, scores: dict[str, float], *, val: float = 0.5, epoch: int = 3) -> Path:
    folder.mkdir(parents=True)
    dice = sum(scores.values()) / len(scores)
    (folder / "results.json").write_text(json.dumps({
        "test": {"dice": dice, "iou": dice / 2}, "best_val_dice": val, "selected_epoch": epoch, "git_sha": "abc",
    }))
    rows = "".join(f'"{k}",{v},{v / 2}\n' for k, v in scores.items())
    (folder / "test_scores.csv").write_text("id,dice,iou\n" + rows)
    return folder


def test_rows_are_paired_on_the_images_both_scored(tmp_path: Path) -> None:
    base = _unit(tmp_path / "base", {"a": 0.5, "b": 0.2, "c": 0.4})
    better = _unit(tmp_path / "better", {"a": 0.7, "b": 0.2, "c": 0.1, "d": 0.9}, val=0.6, epoch=7)
    table = table2([("SupOnly", base), ("+FPA", better)], resamples=200)
    first, second = table["rows"]
    assert table["baseline"] == "SupOnly" and "paired" not in first
    paired = second["paired"]
    # only a, b, c are shared: differences +0.2, 0, -0.3
    assert paired["images"] == 3
    assert paired["mean_diff_dice"] == pytest.approx(-0.1 / 3, abs=1e-12)
    assert paired["mean_diff_iou"] == pytest.approx(-0.05 / 3, abs=1e-12)
    assert (paired["better"], paired["worse"], paired["tied"]) == (1, 1, 1)
    low, high = paired["ci95"]
    assert -0.3 - 1e-9 <= low <= paired["mean_diff_dice"] <= high <= 0.2 + 1e-9
    text = table2_markdown(table)
    assert "| +FPA | 47.50 | 23.75 | 60.00 (7) | -3.33 [" in text
    assert "| SupOnly | 36.67 |" in text and "(baseline)" in text


def test_errors_name_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _unit(tmp_path / "base", {"a": 0.5})
    with pytest.raises(FileNotFoundError, match="missing"):
        table2([("SupOnly", base), ("x", tmp_path / "missing")])
    other = _unit(tmp_path / "other", {"z": 0.5})
    with pytest.raises(ValueError, match="share no test image"):
        table2([("SupOnly", base), ("x", other)])
    with pytest.raises(ValueError, match="at least one row"):
        table2([])
    with pytest.raises(SystemExit):
        main([f"SupOnly{base}"])
    assert "LABEL=UNIT_FOLDER" in capsys.readouterr().err


def test_the_command_prints_and_writes_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = _unit(tmp_path / "base", {"a": 0.5, "b": 0.3})
    row = _unit(tmp_path / "row", {"a": 0.6, "b": 0.4})
    main([f"SupOnly={base}", f"all={row}", "--json", str(tmp_path / "t.json"), "--bootstrap", "100"])
    assert "| all | 50.00 | 25.00 | 50.00 (3) | +10.00 [+10.00, +10.00] |" in capsys.readouterr().out
    written = json.loads((tmp_path / "t.json").read_text())
    assert written["rows"][1]["paired"]["mean_diff_dice"] == pytest.approx(0.1)
