"""Run a suite's plan: time and measure every case, stopping a series that gets too slow or big.

Rules, applied per series (one operation, implementation and dtype over ascending sizes):

- **Time limit.** A case whose first (warm-up) call takes longer than ``time_limit`` seconds is
  recorded as ``"skipped: > 60 s"`` (with the limit in force) and the larger sizes of its series
  are not run. A size whose run time, predicted from the previous size by the suite's cost
  model, exceeds twice the limit is skipped the same way without running, with the prediction
  in the note.
- **Memory guard.** A case whose estimated extra peak exceeds ``memory_fraction`` of the free
  memory (MemAvailable on CPU, free device memory on CUDA) is recorded as
  ``"skipped: out of memory"`` with the estimate, and the larger sizes are skipped too.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import traceback
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.harness import (
    MiB,
    Case,
    Suite,
    available_bytes,
    cpu_peak_extra_mib,
    cuda_peak_extra_mib,
    time_once_counting_flops,
    time_runs,
)

GiB = 1024**3


@dataclasses.dataclass
class Settings:
    """How hard to measure. ``memory`` turns the peak-memory measurements on or off."""

    min_run_time: float = 2.0
    repeats: int = 5
    time_limit: float = 60.0
    memory: bool = True
    memory_fraction: float = 0.5

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _skip_label(settings: Settings) -> str:
    return f"skipped: > {settings.time_limit:g} s"


def run_suite(suite: Suite, device: torch.device, mode: str, settings: Settings, log: Callable[[str], None]) -> dict[str, Any]:
    """Measure a suite; returns its JSON section (title, implementations, results)."""
    section: dict[str, Any] = {
        "title": suite.title,
        "impls": list(suite.impls),
        "impl_labels": dict(suite.impl_labels),
        "ratio": suite.ratio,
        "notes": list(suite.notes),
        "results": [],
    }
    reason = suite.available()
    if reason is not None:
        section["unavailable"] = reason
        log(f"[{suite.name}] not run: {reason}")
        return section
    for series in suite.plan(device.type, mode):
        stopped: dict[str, tuple[str, str]] = {}  # impl -> (status, note) once a series stops
        previous: dict[str, tuple[float, float, dict[str, int]]] = {}  # impl -> (work, seconds, sizes)
        for sizes in series.sizes:
            for impl in suite.impls:
                case = Case(suite.name, series.op, impl, series.dtype, dict(sizes))
                entry = _measure(suite, case, device, settings, stopped, previous, series.memory)
                section["results"].append(entry)
                log(_describe(case, entry))
    return section


def _measure(
    suite: Suite,
    case: Case,
    device: torch.device,
    settings: Settings,
    stopped: dict[str, tuple[str, str]],
    previous: dict[str, tuple[float, float, dict[str, int]]],
    memory: bool,
) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "op": case.op,
        "impl": case.impl,
        "dtype": case.dtype,
        "sizes": dict(case.sizes),
        "status": "ok",
    }
    if case.impl in stopped:
        entry["status"], entry["note"] = stopped[case.impl]
        return entry
    estimate = suite.estimate_bytes(case)
    free = available_bytes(device)
    entry["estimated_peak_mib"] = round(estimate / MiB, 1)
    if estimate > settings.memory_fraction * free:
        note = (
            f"estimated extra peak {estimate / GiB:.1f} GiB exceeds {settings.memory_fraction:g} of the "
            f"{free / GiB:.1f} GiB free; not run"
        )
        stopped[case.impl] = ("skipped: out of memory", f"a smaller size needed more than the guard allows ({note})")
        entry["status"], entry["note"] = "skipped: out of memory", note
        return entry
    work = suite.work(case)
    if case.impl in previous:
        prev_work, prev_seconds, prev_sizes = previous[case.impl]
        predicted = prev_seconds * work / max(prev_work, 1e-30)
        if predicted > 2 * settings.time_limit:
            note = f"predicted ~{predicted:.0f} s per run from {prev_seconds:.2f} s at {_dims(prev_sizes)}; not run"
            stopped[case.impl] = (_skip_label(settings), f"series stopped at a smaller size ({note})")
            entry["status"], entry["note"] = _skip_label(settings), note
            return entry
    fn: Callable[[], object] | None = None
    try:
        torch.manual_seed(0)
        fn = suite.build(case, device)
        single, flops = time_once_counting_flops(fn, device)  # warm-up call: the guard's measurement and the FLOPs
        entry["single_run_s"] = single
        if (formula := suite.formula_flops(case)) is not None:  # elementwise work the counter cannot see
            flops, entry["flops_source"] = int(formula), "formula"
        entry["flops"] = flops
        if single > settings.time_limit:
            note = f"one run took {single:.1f} s; larger sizes not run"
            stopped[case.impl] = (_skip_label(settings), f"series stopped at a smaller size ({note})")
            entry["status"], entry["note"] = _skip_label(settings), note
            return entry
        entry.update(time_runs(fn, device, min_run_time=settings.min_run_time, single=single, repeats=settings.repeats))
        if flops > 0:
            entry["gflop_per_s"] = flops / entry["median_s"] / 1e9
        previous[case.impl] = (work, entry["median_s"], dict(case.sizes))
        if settings.memory and memory:
            if device.type == "cuda":
                entry["peak_extra_mib"] = cuda_peak_extra_mib(fn, device)
            else:
                del fn
                fn = None
                gc.collect()
                entry["peak_extra_mib"] = cpu_peak_extra_mib(case, timeout=max(120.0, 10 * settings.time_limit))
    except torch.OutOfMemoryError as error:
        entry["status"], entry["note"] = "failed: out of memory", str(error).splitlines()[0]
        stopped[case.impl] = ("skipped: out of memory", "a smaller size ran out of memory")
    except Exception as error:  # a failing case is recorded, the run goes on
        entry["status"] = "failed"
        entry["note"] = f"{type(error).__name__}: {error}".splitlines()[0][:300]
        entry["traceback"] = traceback.format_exc(limit=4)
    finally:
        fn = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return entry


def _dims(sizes: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in sizes.items())


def _describe(case: Case, entry: dict[str, Any]) -> str:
    head = f"[{case.suite}] {case.op:<22} {case.impl:<10} {case.dtype:<9} {_dims(case.sizes):<28}"
    if entry["status"] != "ok":
        return f"{head} {entry['status']} ({entry.get('note', '')})"
    text = f"{head} {format_seconds(entry['median_s'])} (IQR {format_seconds(entry['iqr_s'])}, {entry['runs']} runs)"
    if entry.get("flops"):
        text += f", {entry['flops'] / 1e9:.3g} GFLOP at {entry['gflop_per_s']:.3g} GFLOP/s"
    if "peak_extra_mib" in entry:
        text += f", extra peak {entry['peak_extra_mib']:.1f} MiB"
    return text


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"
