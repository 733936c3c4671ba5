"""The benchmark suites by name, imported on first use (a memory child loads only its own)."""

from __future__ import annotations

import importlib

from benchmarks.harness import Suite

# name -> "module:class"; the order is the order of the report
REGISTRY = {
    "fpa_sdpa": "benchmarks.suites.fpa_sdpa:FPAvsSDPASuite",
    "fpa": "benchmarks.suites.fpa:FPASuite",
    "fpa_kv_stride": "benchmarks.suites.fpa_kv_stride:FPAKVStrideSuite",
    "epa": "benchmarks.suites.epa:EPASuite",
    "pal": "benchmarks.suites.pal:PALSuite",
    "masking": "benchmarks.suites.masking:MaskingSuite",
    "iteration": "benchmarks.suites.iteration:IterationSuite",
}
NAMES = list(REGISTRY)
_loaded: dict[str, Suite] = {}


def get(name: str) -> Suite:
    if name not in _loaded:
        module, cls = REGISTRY[name].split(":")
        _loaded[name] = getattr(importlib.import_module(module), cls)()
    return _loaded[name]
