"""Shared benchmark machinery: cases, suites, timing, peak memory and run metadata.

Timing uses ``torch.utils.benchmark.Timer`` with every thread torch uses (its default is one
thread) and a timer that synchronises the device, and reports the median and the IQR of
``blocked_autorange``.

Peak memory is the *extra* memory one call needs on top of its inputs:

- CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the
  memory allocated before the call.
- CPU: a fresh Python process per measurement, started with ``MALLOC_MMAP_THRESHOLD_=65536``
  so that every freed block of 64 KiB or more goes straight back to the system and the
  resident set is exact. It runs a tiny warm-up call (kernels, thread pool, allocator), builds
  the inputs, reads ``VmRSS`` as the baseline, resets the peak (``VmHWM``) by writing "5" to
  ``/proc/self/clear_refs``, runs the call once and reports ``VmHWM - baseline``.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import json
import logging
import os
import platform
import subprocess
import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# torch.utils.benchmark imports cpp_extension, which warns about a missing CUDA runtime on CPU-only
# machines; that is irrelevant to Python-statement timing.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
import torch.utils.benchmark as torch_benchmark  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MiB = 1024**2
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "int64": torch.int64}
SEED = 0


@dataclasses.dataclass
class Case:
    """One measurement: an operation of a suite, one implementation, one dtype, one size.

    ``sizes`` is an ordered dict of named sizes (e.g. B, C, H, W); ``impl`` is one of the
    suite's two implementations (``suite.impls``).
    """

    suite: str
    op: str
    impl: str
    dtype: str
    sizes: dict[str, int]

    def label(self) -> str:
        dims = " ".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.suite}/{self.op}/{self.impl}/{self.dtype} {dims}"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @staticmethod
    def from_json(text: str) -> Case:
        return Case(**json.loads(text))


Runner = Callable[[], object]


class Suite:
    """A benchmark suite: one kernel (or step), a fast path and the baseline it is compared with.

    Subclasses set the class attributes and implement :meth:`plan`, :meth:`build`,
    :meth:`estimate_bytes` and :meth:`tiny`. ``impls`` is ``(candidate, baseline)``:
    ``ratio`` says how the two are compared in the report, ``"speedup"`` (baseline time over
    candidate time: the fast path against the dense reference) or ``"overhead"`` (candidate
    over baseline: the CSC-PA iteration against the plain one).
    """

    name: str = ""
    title: str = ""
    impls: tuple[str, str] = ("fast", "reference")
    impl_labels: dict[str, str] = {}
    ratio: str = "speedup"
    notes: tuple[str, ...] = ()

    def available(self) -> str | None:
        """None when the code under test exists, else why the suite cannot run."""
        return None

    def plan(self, device: str, mode: str) -> list[Series]:
        """What to measure; ``mode`` is "full", "quick" or "smoke". Sizes ascend in cost."""
        raise NotImplementedError

    def build(self, case: Case, device: torch.device) -> Runner:
        """Make the inputs (seeded) and return a closure that runs the measured call once."""
        raise NotImplementedError

    def estimate_bytes(self, case: Case) -> float:
        """A generous estimate of the extra peak memory of one call, to skip what cannot fit."""
        raise NotImplementedError

    def work(self, case: Case) -> float:
        """Relative cost of a call, to predict the next size's run time from this one's."""
        return float(self.estimate_bytes(case))

    def tiny(self, case: Case) -> Case:
        """The same case at a tiny size, for the warm-up call of a memory measurement."""
        raise NotImplementedError

    def formula_flops(self, case: Case) -> float | None:
        """FLOPs from the operation's arithmetic, for cases whose work is elementwise.

        The counter sees matmuls only; a suite whose work is elementwise products and sums
        (PAL, EPA's attention) returns its count here, used for both implementations so
        their GFLOP/s compare like with like. None (the default) keeps the counted FLOPs;
        index and comparison work (masking, the edge mask) stays at 0, not dressed up as FLOPs.
        """
        return None


@dataclasses.dataclass
class Series:
    """One operation in one dtype over ascending sizes; each size runs both implementations."""

    op: str
    dtype: str
    sizes: list[dict[str, int]]
    memory: bool = True  # False: time only (quick mode keeps memory for the targets' ops)


PAPER = {"B": 8, "C": 512, "H": 129, "W": 129}  # the paper's batch and width, a 513 crop at output stride 4


def default_dtypes(device: str, mode: str) -> list[str]:
    """float32 and bfloat16, plus float16 on CUDA (not in the short "paper" mode); float32 for smoke."""
    if mode == "smoke":
        return ["float32"]
    if mode == "paper":
        return ["float32", "bfloat16"]
    return ["float32", "bfloat16"] + (["float16"] if device == "cuda" else [])


def seeded_generator(device: torch.device | str = "cpu", offset: int = 0) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(SEED + offset)


def disk_labels(b: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """(B, H, W) int64 masks, one centred disk per image with radii from H/8 to H/3."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    radius = torch.linspace(max(h / 8, 1.0), max(h / 3, 1.0), b).view(b, 1, 1)
    return (((yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2) < radius**2).long().to(device)


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


def select_device(name: str) -> torch.device:
    """The device asked for, or SystemExit with a clear message when it is not there."""
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(
                "benchmarks: --device cuda was asked for, but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}, "
                f"{torch.cuda.device_count()} devices visible). Run on a machine with an NVIDIA "
                "GPU and a CUDA build of PyTorch, or use --device cpu."
            )
        return torch.device("cuda", torch.cuda.current_device())
    raise SystemExit(f"benchmarks: --device must be one of 'cpu', 'cuda', got {name!r}")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------- timing


def time_once(fn: Runner, device: torch.device) -> float:
    """Wall time of one call, device synchronised (also the warm-up of the measurement)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def time_runs(fn: Runner, device: torch.device, *, min_run_time: float, single: float, repeats: int) -> dict[str, Any]:
    """Median and IQR with ``torch.utils.benchmark``, at least ``repeats`` runs.

    ``single`` is the time of one call already measured (the warm-up); the run time asked of
    ``blocked_autorange`` is stretched to ``repeats`` such calls so that slow cases still get
    several replicates and a meaningful IQR.
    """

    def sync_timer() -> float:
        synchronize(device)
        return timeit.default_timer()

    timer = torch_benchmark.Timer(
        stmt="fn()",
        globals={"fn": fn},
        num_threads=torch.get_num_threads(),  # the default is ONE thread
        timer=sync_timer,
    )
    m = timer.blocked_autorange(min_run_time=max(min_run_time, repeats * single))
    return {
        "median_s": m.median,
        "iqr_s": m.iqr,
        "runs": len(m.times),
        "number_per_run": m.number_per_run,
    }


# ---------------------------------------------------------------------------------- FLOPs


def _cpu_sdpa_forward_flops(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return int(sdpa_flop_count(query, key, value))


def _cpu_sdpa_backward_flops(
    grad_out: Any, query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any
) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return int(sdpa_backward_flop_count(grad_out, query, key, value))


def _in_place_mm_flops(self_shape: Any, a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * int(torch.Size(a_shape).numel()) * int(b_shape[-1])  # (…, n, k) @ (…, k, m): 2·…·n·k·m


def _mv_flops(a_shape: Any, b_shape: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return 2 * int(a_shape[0]) * int(a_shape[1])  # (n, k) @ (k,)


def flop_counter() -> Any:
    """``FlopCounterMode`` that also counts what it misses on CPU.

    torch's counter has formulas for mm, addmm, bmm, baddbmm, convolutions and the CUDA
    attention kernels, but none for the CPU flash attention (``_scaled_dot_product_flash_
    attention_for_cpu`` and its backward, counted as 0), for matrix-vector products (``mv``,
    EPA's softmax-weighted sums) nor for the in-place ``addmm_`` and ``baddbmm_`` our
    hand-written backwards use. Those get the usual formulas here: attention
    forward 2 matmuls (4·B·N·N'·d), backward 5 (the scores recomputed, then dV, dP, dQ, dK).
    Elementwise work (softmax, norms, activations) is not counted, as in torch's counter.
    """
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    return FlopCounterMode(
        display=False,
        custom_mapping={
            aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward_flops,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
            aten.mv: _mv_flops,
            aten.addmm_: _in_place_mm_flops,
            aten.baddbmm_: _in_place_mm_flops,
        },
    )


def time_once_counting_flops(fn: Runner, device: torch.device) -> tuple[float, int]:
    """:func:`time_once` under :func:`flop_counter`: the warm-up call also counts the FLOPs.

    The counter adds a little Python work per operator, so this time is a guard, not a result.
    """
    with flop_counter() as counter:
        single = time_once(fn, device)
    return single, int(counter.get_total_flops())


# ---------------------------------------------------------------------------------- memory


def cuda_peak_extra_mib(fn: Runner, device: torch.device) -> float:
    synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    baseline = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline) / MiB


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def cpu_peak_extra_child(suite: Suite, case: Case, threads: int) -> float:
    """Inside the fresh process: the extra peak resident memory (MiB) of one call of ``case``."""
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    suite.build(suite.tiny(case), device)()  # warm-up: kernels, thread pool, allocator arenas
    fn = suite.build(case, device)
    gc.collect()
    baseline = _proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    fn()
    return (_proc_status_kib("VmHWM") - baseline) / 1024


def cpu_peak_extra_mib(case: Case, *, timeout: float) -> float:
    """Run :func:`cpu_peak_extra_child` in a fresh interpreter (see the module docstring)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    command = [
        sys.executable,
        str(ROOT / "benchmarks" / "run.py"),
        "--memory-child",
        case.to_json(),
        "--threads",
        str(torch.get_num_threads()),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"memory child failed (rc {done.returncode}): {' | '.join(tail)}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def cpu_supports_peak_reset() -> bool:
    """clear_refs "5" (VmHWM reset) needs Linux >= 4.0 and a writable /proc/self/clear_refs."""
    return Path("/proc/self/clear_refs").exists() and Path("/proc/self/status").exists()


def available_bytes(device: torch.device) -> float:
    """Memory free for one measurement: MemAvailable on CPU, free device memory on CUDA."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return float(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    return float("inf")


# ---------------------------------------------------------------------------------- metadata


def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return done.stdout.strip() if done.returncode == 0 else "unknown"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_features() -> list[str]:
    """The SIMD features that decide float32/bfloat16 kernel speed (AVX2, AVX-512, BF16, AMX)."""
    wanted = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def metadata(device: torch.device) -> dict[str, Any]:
    """Everything needed to compare two result files: code, library versions, machine."""
    cuda = device.type == "cuda"
    flags = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": _git("rev-parse", "HEAD"),
        "git_dirty": bool(flags) and flags != "unknown",
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if cuda else cpu_model(),
        "device_count": torch.cuda.device_count() if cuda else 1,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_features": cpu_features(),
        "threads": torch.get_num_threads(),
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "loadavg_at_start": load_average(),
        "cpu_busy_at_start": cpu_busy_fraction() if device.type == "cpu" else None,
    }


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from /proc/stat."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cpu_busy_fraction(seconds: float = 1.0, settle: float = 0.3) -> float | None:
    """Share of all CPU time used while this process sleeps for ``seconds``: other processes' load.

    Unlike the load average, this does not remember this run's own earlier work. ``settle``
    first lets this process's thread pool stop spinning after its last parallel region.
    """
    time.sleep(settle)
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages; above the thread count, timings are contended."""
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return None
