"""PAL forward + backward on CPU: the layer against the dense 8-shifted-copies reference.

    python benchmarks/pal_cpu.py [--out benchmarks/results/pal_cpu.json] [--min-run-time 10] [--rounds 3]

Times with torch.utils.benchmark (all threads, median and IQR) in interleaved rounds, and
reports the median of the round medians and the best round (the CPU may be shared). Measures the extra peak
resident memory of one forward + backward in a fresh subprocess each (MALLOC_MMAP_THRESHOLD_ so
that freed blocks go back to the system and the peak is exact). Writes one JSON with metadata.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cscpa_layers import pixel_affinity_loss  # noqa: E402
from cscpa_layers._reference.affinity_loss import pixel_affinity_loss_dense  # noqa: E402

SHAPE = (8, 512, 64, 64)


def make_inputs(form: str, shape: tuple[int, int, int, int] = SHAPE) -> dict[str, torch.Tensor | None]:
    """Features, a disk 'lesion' per image as target, a confidence map and target features."""
    gen = torch.Generator().manual_seed(0)
    b, c, h, w = shape
    features = torch.randn(b, c, h, w, generator=gen).requires_grad_()
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    radius = torch.linspace(h / 8, h / 3, b).view(b, 1, 1)
    target = (((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < radius**2).long()
    pseudo = form == "pseudo"
    return {
        "features": features,
        "target": target,
        "confidence": torch.rand(b, h, w, generator=gen) if pseudo else None,
        "target_features": torch.randn(b, c, h, w, generator=gen) if pseudo else None,
    }


def step(fn_name: str, inputs: dict[str, torch.Tensor | None]) -> None:
    features, target = inputs["features"], inputs["target"]
    assert features is not None and target is not None
    if fn_name == "layer":
        loss = pixel_affinity_loss(
            features, target, confidence=inputs["confidence"], target_features=inputs["target_features"]
        )
    else:
        loss = pixel_affinity_loss_dense(
            features, target, inputs["confidence"], inputs["target_features"]
        )
    loss.backward()
    features.grad = None


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def measure_memory_child(fn_name: str, form: str) -> None:
    """Runs in a fresh process: print the extra peak RSS (MiB) of one forward + backward."""
    step(fn_name, make_inputs(form, (2, 8, 8, 8)))  # warm-up: kernels, allocator, thread pool
    inputs = make_inputs(form)
    gc.collect()
    baseline = _rss_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    step(fn_name, inputs)
    print(json.dumps({"peak_extra_mib": (_rss_kib("VmHWM") - baseline) / 1024}))


def measure_memory(fn_name: str, form: str) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(torch.get_num_threads()))
    out = subprocess.run(
        [sys.executable, __file__, "--child", fn_name, form], env=env, capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"])


def measure_time(fn_name: str, form: str, min_run_time: float) -> dict[str, float]:
    inputs = make_inputs(form)
    step(fn_name, inputs)  # warm-up
    timer = benchmark.Timer(
        stmt="step(fn_name, inputs)",
        globals={"step": step, "fn_name": fn_name, "inputs": inputs},
        num_threads=torch.get_num_threads(),
    )
    m = timer.blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def summarise(rounds: list[dict[str, float]]) -> dict[str, object]:
    """Median of the per-round medians, and the best round (other jobs share the machine)."""
    medians = sorted(r["median_s"] for r in rounds)
    return {
        "median_s": medians[len(medians) // 2],
        "best_round_median_s": medians[0],
        "rounds": rounds,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pal_cpu.json"))
    parser.add_argument("--min-run-time", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads; 0 keeps torch's default")
    parser.add_argument("--child", nargs=2)
    args = parser.parse_args()
    if args.child:
        measure_memory_child(*args.child)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except OSError:
        sha = "unknown"
    results: dict[str, object] = {
        "benchmark": "PAL forward + backward, float32",
        "shape_BCHW": SHAPE,
        "git_sha": sha,
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": {},
    }
    table = results["results"]
    assert isinstance(table, dict)
    for form in ("gt", "pseudo"):
        rounds: dict[str, list[dict[str, float]]] = {"layer": [], "dense": []}
        for _ in range(args.rounds):  # interleaved, so that a busy spell hits both
            for fn_name in ("layer", "dense"):
                rounds[fn_name].append(measure_time(fn_name, form, args.min_run_time))
                print(form, fn_name, json.dumps(rounds[fn_name][-1]), flush=True)
        for fn_name in ("layer", "dense"):
            entry = summarise(rounds[fn_name])
            entry["peak_extra_mib"] = min(measure_memory(fn_name, form) for _ in range(2))
            table[f"{form}/{fn_name}"] = entry
        fast, dense = table[f"{form}/layer"], table[f"{form}/dense"]
        print(
            f"{form}: layer {fast['median_s']:.4f} s (best round {fast['best_round_median_s']:.4f}), "
            f"dense {dense['median_s']:.3f} s (best round {dense['best_round_median_s']:.3f}); "
            f"{dense['median_s'] / fast['median_s']:.1f}x faster; "
            f"memory {fast['peak_extra_mib']:.0f} vs {dense['peak_extra_mib']:.0f} MiB, "
            f"{dense['peak_extra_mib'] / fast['peak_extra_mib']:.1f}x less",
            flush=True,
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
