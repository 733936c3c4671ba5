"""The public API is explicit and pinned: adding or removing a name is a deliberate change."""

from __future__ import annotations

import importlib
import pathlib
import re

import cscpa_layers

EXPECTED = {
    "AdaptiveEdgeContainer",
    "EdgePrototypeAttention",
    "ForegroundPrototypeAttention",
    "__version__",
    "channel_prototypes",
    "correlation_map",
    "edge_mask",
    "edge_prototype_attention",
    "foreground_prototype_attention",
    "select_edge_features",
    # pixel affinity loss, confidence masking, pseudo-labels (issue 4)
    "ConfidenceMasking",
    "MaskedImages",
    "NEIGHBOUR_OFFSETS",
    "PixelAffinity",
    "PixelAffinityLoss",
    "PseudoLabels",
    "confidence_mask",
    "entropy_keep_mask",
    "keep_hard_schedule",
    "keep_percent_schedule",
    "pixel_affinity",
    "pixel_affinity_loss",
    "pseudo_labels",
}


def test_all_is_sorted_and_pinned() -> None:
    assert cscpa_layers.__all__ == sorted(cscpa_layers.__all__)
    assert set(cscpa_layers.__all__) == EXPECTED
    for name in cscpa_layers.__all__:
        assert hasattr(cscpa_layers, name), name


def test_version_is_a_release_string() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", cscpa_layers.__version__)


def test_package_ships_py_typed() -> None:
    assert (pathlib.Path(cscpa_layers.__file__).parent / "py.typed").is_file()


def test_library_never_imports_examples_or_configs() -> None:
    root = pathlib.Path(cscpa_layers.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert not re.search(r"^\s*(from|import)\s+examples\b", text, re.M), path
        assert "argparse" not in text and "yaml" not in text, path


def test_runtime_dependencies_are_torch_einops_numpy_only() -> None:
    root = pathlib.Path(cscpa_layers.__file__).parent
    allowed = {"torch", "einops", "numpy", "cscpa_layers", "__future__"}
    stdlib = {"collections", "contextlib", "dataclasses", "math", "typing", "os", "functools", "itertools", "warnings", "enum"}
    for path in root.rglob("*.py"):
        for module in re.findall(r"^\s*(?:from|import)\s+([A-Za-z_][\w]*)", path.read_text(), re.M):
            assert module in allowed | stdlib, f"{path}: imports {module}"
    importlib.import_module("cscpa_layers._reference")
