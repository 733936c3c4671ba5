"""run.py's main job: its command line, with and without a preset."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from examples.engine.arguments import config_for, parse_args
from examples.engine.config import PRESETS

ROOT = Path(__file__).resolve().parents[1]


def _run_py() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_py", ROOT / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_main_job_defaults_and_overrides() -> None:
    run = _run_py()
    command = run.main_job(["--epochs", "2"])
    assert command[:2] == ["-m", "examples.train_busi"]
    args = parse_args(command[2:])
    assert (args.backbone, args.no_pretrained, args.epochs, args.data) == ("efficientnet_lite0", False, 2, "phantom")
    assert (args.output_stride, args.pretrain_epochs, args.precise_bn, args.epa_gate) == (8, 4, 10, True)
    assert args.ema == 0.98 and (args.select, args.average_epochs) == ("average", 6)
    assert config_for(args, "cscpa", 0).masking is False
    # arguments after `main` win: --masking restores the paper's masking
    assert config_for(parse_args(run.main_job(["--masking"])[2:]), "cscpa", 0).masking is True


def test_a_preset_replaces_the_main_jobs_own_settings() -> None:
    run = _run_py()
    args = parse_args(run.main_job(["--data", "/some/BUSI", "--preset", "cpu"])[2:])
    for key, value in PRESETS["cpu"].items():
        assert getattr(args, key) == value, key
    assert (args.no_pretrained, args.data, args.method, args.out) == (False, "/some/BUSI", "both", "runs/quickstart")
    assert config_for(args, "cscpa", 0).masking is True  # the CPU protocol keeps the paper's masking


def test_a_failed_venv_is_removed_and_explained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_py()
    target = tmp_path / "venv"
    monkeypatch.setattr(run, "VENV", target)

    def no_ensurepip(self: object, path: object) -> None:
        target.mkdir()
        (target / "half-made").write_text("")
        raise subprocess.CalledProcessError(1, ["python", "-m", "ensurepip"])

    monkeypatch.setattr(run.venv.EnvBuilder, "create", no_ensurepip)
    assert run.main(["test"]) == 1
    message = capsys.readouterr().err
    assert "could not create a virtual environment" in message and "python3-venv" in message
    assert not target.exists()


def test_a_failed_install_names_the_package_index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    run = _run_py()
    monkeypatch.setattr(run, "VENV", tmp_path / "venv")
    monkeypatch.setattr(run, "venv_python", lambda: Path(sys.executable))  # "exists": skip creation

    def offline(*args: object, **kwargs: object) -> None:
        raise subprocess.CalledProcessError(1, ["pip", "install"])

    monkeypatch.setattr(run.subprocess, "run", offline)
    (tmp_path / "venv").mkdir()
    assert run.main(["test"]) == 1
    assert "pip could not install cscpa_layers[test,examples,export]" in capsys.readouterr().err


def _fake_venv(run: ModuleType, target: Path, extras: str) -> None:
    """A venv whose python exists and whose stamp says these package files were installed with ``extras``."""
    python = run.venv_python()
    python.parent.mkdir(parents=True)
    python.write_text("")
    digest = run.hashlib.sha256()
    for name in ("pyproject.toml", "setup.cfg"):
        digest.update((ROOT / name).read_bytes())
    (target / ".cscpa-installed").write_text(f"{digest.hexdigest()} {extras}")


def test_the_tests_environment_serves_the_main_job_without_a_new_install(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    run = _run_py()
    target = tmp_path / "venv"
    monkeypatch.setattr(run, "VENV", target)
    _fake_venv(run, target, run.EXTRAS["test"])
    calls: list[object] = []
    monkeypatch.setattr(run.subprocess, "run", lambda *a, **k: calls.append(a))
    assert run.ensure_environment(run.EXTRAS["main"]) == run.venv_python()
    assert calls == []  # test,examples,export covers examples
    (target / ".cscpa-installed").write_text("another-digest " + run.EXTRAS["test"])
    run.ensure_environment(run.EXTRAS["main"])
    assert len(calls) == 1  # changed package files: install again


def test_a_second_run_py_waits_for_the_first_ones_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import threading

    run = _run_py()
    target = tmp_path / "venv"
    monkeypatch.setattr(run, "VENV", target)
    _fake_venv(run, target, run.EXTRAS["main"])
    done = threading.Event()
    with run._install_lock():  # the first run.py, still installing
        worker = threading.Thread(target=lambda: (run.ensure_environment(run.EXTRAS["main"]), done.set()))
        worker.start()
        worker.join(timeout=1.0)
        assert not done.is_set()  # blocked on the lock, not racing into pip
    worker.join(timeout=10)
    assert done.is_set()
    assert "waiting for another run.py" in capsys.readouterr().out
    assert (tmp_path / "venv.lock").exists()  # beside the venv, named after it (.venv.lock by default)
