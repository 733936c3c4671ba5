"""examples/ stays a package a newcomer can read (issue 13): short files, no sys.path edits,
and nothing imports the training command."""

from __future__ import annotations

import re
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FILES = sorted(EXAMPLES.rglob("*.py"))


def test_every_room_is_a_package_and_every_file_is_short() -> None:
    assert {p.parent.name for p in FILES} >= {"examples", "data", "models", "engine", "tutorials"}
    for folder in {p.parent for p in FILES}:
        assert (folder / "__init__.py").is_file(), folder
    long = {str(p.relative_to(EXAMPLES)): n for p in FILES if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"files over 300 lines: {long}"


def test_no_file_edits_sys_path_or_imports_the_training_command() -> None:
    for path in FILES:
        text = path.read_text()
        assert not re.search(r"sys\.path\.(insert|append)|sys\.path\[\d\]\s*=", text), path
        if path.name != "train_busi.py":
            assert not re.search(r"^\s*(from examples import train_busi|from examples\.train_busi import|"
                                 r"import examples\.train_busi)", text, re.M), path
