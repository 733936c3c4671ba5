"""examples/tutorials/epa_custom_loop.py runs as a user would run it, and EPA learns inside it."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_epa_in_a_custom_training_loop() -> None:
    # PYTHONPATH puts this checkout's cscpa_layers first, whatever the environment installed.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-m", "examples.tutorials.epa_custom_loop", "--pretrain", "20", "--steps", "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    out = result.stdout
    before = float(re.search(r"before training: held-out IoU ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    after = float(re.search(r"after 30 steps: held-out IoU ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    losses = [float(v) for v in re.findall(r"loss ([\d.]+)", out)]
    drift = float(re.search(r"mixer moved ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    assert re.search(r"initialised the container from [1-9]\d* candidates", out)
    counts = [int(v) for v in re.findall(r"candidates (\d+)$", out, re.M)]
    assert counts and all(c > 0 for c in counts)
    assert losses[-1] < losses[0]
    assert after > before + 0.3
    assert drift > 0  # the mixer received gradient through the updated bank
    assert "state_dict round trip keeps the bank: True" in out
