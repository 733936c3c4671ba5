"""The ``Example:`` blocks in examples/ run (pytest's doctest run covers only the library)."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = [
    "examples.data.samples",
    "examples.data.transforms",
    "examples.data.base",
    "examples.data.registry",
    "examples.data.phantom",
    "examples.data.phantom_dataset",
    "examples.data.duplicates",
    "examples.models.deeplab",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str) -> None:
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS, verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} doctest lines failed in {name}"
    assert result.attempted > 0
