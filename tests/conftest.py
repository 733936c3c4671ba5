"""Shared test configuration: bounded hypothesis profiles and common helpers."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from hypothesis import HealthCheck, settings

# Property tests stay bounded (style rule 14): small sides, no deadline (the first call of a
# kernel is slow), and a handful of examples so the suite fits CI's 2-core budget.
settings.register_profile(
    "ci",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tolerances against a float64 reference, by the dtype under test.
TOLERANCES = {
    torch.float64: {"atol": 1e-10, "rtol": 1e-8},
    torch.float32: {"atol": 1e-4, "rtol": 1e-4},
    torch.bfloat16: {"atol": 1e-1, "rtol": 5e-2},
}

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module of tiny-input tests: they gain nothing from threads, and
    on a shared 2-core machine a 2-thread barrier waiting for a busy core made single forwards
    take seconds. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def compile_available() -> bool:
    """torch.compile with the inductor backend needs a working C++ compiler on CPU."""
    import shutil

    return shutil.which(os.environ.get("CXX", "c++")) is not None or shutil.which("gcc") is not None
