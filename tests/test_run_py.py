"""run.py's main job: its command line, with and without a preset."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

from examples import train_busi

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
    assert command[0] == "examples/train_busi.py"
    args = train_busi.parse_args(command[1:])
    assert (args.backbone, args.no_pretrained, args.epochs, args.data) == ("resnet18", True, 2, "phantom")


def test_a_preset_replaces_the_main_jobs_own_settings() -> None:
    run = _run_py()
    args = train_busi.parse_args(run.main_job(["--data", "/some/BUSI", "--preset", "cpu"])[1:])
    for key, value in train_busi.PRESETS["cpu"].items():
        assert getattr(args, key) == value, key
    assert (args.no_pretrained, args.data, args.method, args.out) == (False, "/some/BUSI", "both", "runs/quickstart")
