"""The example scripts run as a user would run them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fpa_in_a_sequential_net_trains() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "examples.tutorials.fpa_sequential", "--steps", "40"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    before = float(re.search(r"before training: held-out IoU ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    after = float(re.search(r"after 40 steps .*held-out IoU ([\d.]+)", result.stdout).group(1))  # type: ignore[union-attr]
    losses = [float(v) for v in re.findall(r"loss ([\d.]+)", result.stdout)]
    assert losses[-1] < losses[0]
    assert after > before + 0.3
