"""Confidence-based masking on CPU: the vectorised layer against the per-patch loop reference.

    python benchmarks/masking_cpu.py [--out benchmarks/results/masking_cpu.json] [--min-run-time 5]

B = 8 images of 513 x 513 with K = 2 classes and 57-pixel patches (the paper's 9 x 9 grid).
Times with torch.utils.benchmark on all threads in interleaved rounds (the CPU may be shared),
reports the median of the round medians and the best round, and writes one JSON with metadata.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch
import torch.utils.benchmark as benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cscpa_layers import confidence_mask  # noqa: E402
from cscpa_layers._reference.confidence_mask import confidence_mask_loop  # noqa: E402

SHAPE = (8, 2, 513, 513)


def make_probs() -> torch.Tensor:
    """Softmax of smooth random logits with a blob of foreground per image."""
    gen = torch.Generator().manual_seed(0)
    b, k, h, w = SHAPE
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    blob = 4 * (0.3 - (yy**2 + xx**2).sqrt())  # > 0 inside a disk of radius 0.3
    noise = torch.nn.functional.interpolate(torch.randn(b, 1, 33, 33, generator=gen), size=(h, w), mode="bilinear")
    fg_logit = blob + 2 * noise[:, 0]
    return torch.stack([torch.zeros_like(fg_logit), fg_logit], 1).softmax(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "masking_cpu.json"))
    parser.add_argument("--min-run-time", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    probs = make_probs()
    fns = {
        "layer": lambda: confidence_mask(probs, generator=torch.Generator().manual_seed(0)),
        "loop": lambda: confidence_mask_loop(probs, generator=torch.Generator().manual_seed(0)),
    }
    assert torch.equal(fns["layer"](), fns["loop"]()), "the layer and the loop reference disagree"
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    results: dict[str, object] = {
        "benchmark": "confidence_mask, patch_size=57, keep_hard=0.7, mask_ratio=0.7, float32",
        "shape_BKHW": SHAPE,
        "git_sha": sha,
        "torch": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "results": {},
    }
    table = results["results"]
    assert isinstance(table, dict)
    rounds: dict[str, list[float]] = {name: [] for name in fns}
    for name, fn in fns.items():
        fn()  # warm-up
    for _ in range(args.rounds):  # interleaved, so that a busy spell hits both
        for name, fn in fns.items():
            timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=args.min_run_time)
            rounds[name].append(m.median)
            print(name, f"median {m.median:.4f} s, IQR {m.iqr:.4f} s, {len(m.times)} runs", flush=True)
    for name, medians in rounds.items():
        ordered = sorted(medians)
        table[name] = {"median_s": ordered[len(ordered) // 2], "best_round_median_s": ordered[0], "round_medians_s": medians}
    print(f"{table['loop']['median_s'] / table['layer']['median_s']:.1f}x faster", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
