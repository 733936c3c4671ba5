"""benchmarks/cuda_check.sh: the dry run does every step on CPU; without a GPU the real run stops at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["environment", "CUDA tests", "benchmarks", "training", "report"]


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    return subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_check.sh"), *args, "--results-dir", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_dry_run_prints_and_runs_every_step_on_cpu(tmp_path: Path) -> None:
    docs = ROOT / "docs" / "benchmarks.md"
    before = docs.read_text()
    done = _run("--dry-run", tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for i, name in enumerate(STEPS, 1):
        assert f"  {i}. {name} (limit" in done.stdout  # the plan is printed first
        assert f"[{i}/5] {name}: ok" in done.stdout
    record = json.loads(next(tmp_path.glob("cuda-check-*-dry-run.json")).read_text())
    assert record["dry_run"] and [s["name"] for s in record["steps"]] == STEPS
    assert all(s["rc"] == 0 for s in record["steps"]) and record["within_budget"]
    assert "--device cpu" in record["steps"][2]["command"] and "--collect-only" in record["steps"][1]["command"]
    assert list(tmp_path.glob("cpu-*-smoke.json"))  # the benchmarks' own JSON went to the dry run's folder
    assert docs.read_text() == before  # the real page is left alone


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_the_real_run_stops_at_the_environment_step(tmp_path: Path) -> None:
    done = _run(tmp_path=tmp_path)
    assert done.returncode == 1
    assert "no CUDA device: this check needs an NVIDIA GPU" in done.stdout
    record = json.loads(next(tmp_path.glob("cuda-check-*.json")).read_text())
    assert [s["name"] for s in record["steps"]] == ["environment"]


def test_an_interpreter_without_torch_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    done = subprocess.run(["bash", str(ROOT / "benchmarks" / "cuda_check.sh"), "--dry-run"], cwd=ROOT,
                          env=dict(os.environ, PYTHON=str(fake)), capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "cannot import torch" in done.stderr


def test_a_step_past_its_limit_keeps_its_output_as_text() -> None:
    # TimeoutExpired hands back what it read as bytes even under text=True; the tail must be
    # the text, not "b'...'"
    from benchmarks.cuda_check import run_step

    argv = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(30)"]
    result = run_step({"name": "slow", "argv": argv, "limit_s": 2})
    assert result["rc"] == 124
    assert result["tail"][0] == "started" and result["tail"][-1] == "stopped after its limit of 2 s"
