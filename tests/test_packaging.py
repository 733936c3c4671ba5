"""The wheel a user installs holds the library, its type marker and nothing else."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_ships_the_package_py_typed_and_the_references(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next(tmp_path.glob("cscpa_layers-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "cscpa_layers/py.typed" in names
    assert "cscpa_layers/__init__.py" in names and "cscpa_layers/_reference/__init__.py" in names
    assert not any(n.startswith(("examples/", "tests/", "benchmarks/")) for n in names)
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("METADATA"))).decode()
    runtime = [
        re.match(r"Requires-Dist: ([A-Za-z0-9_.-]+)", line).group(1)  # type: ignore[union-attr]
        for line in metadata.splitlines()
        if line.startswith("Requires-Dist:") and "extra ==" not in line
    ]
    assert sorted(runtime) == ["einops", "numpy", "torch"]

    target = tmp_path / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    check = subprocess.run(
        [sys.executable, "-c", "import cscpa_layers as c; print(c.__version__, c.ForegroundPrototypeAttention, c.__file__)"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
    )
    assert check.returncode == 0, check.stderr[-2000:]
    assert str(target) in check.stdout and "ForegroundPrototypeAttention" in check.stdout
