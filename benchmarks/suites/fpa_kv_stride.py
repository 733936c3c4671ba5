"""FPA with ``kv_stride=2`` (keys and values from 2 x 2 windows) against exact FPA.

The option exists for large crops, where exact FPA's N² attention costs more than the rest of
the network. This suite measures what it saves; its effect on Dice is a training question,
measured in docs/results.md, not here.
"""

from __future__ import annotations

import torch

from benchmarks.harness import PAPER, Case, Runner, Series, Suite, default_dtypes, itemsize
from benchmarks.suites.fpa import forward_or_backward, fpa_layer_and_input

FULL = [{"B": 2, "C": 512, "H": s, "W": s} for s in (64, 96, 129)]  # B = 2 keeps exact FPA at 129² to ~1 min on CPU
FULL_CUDA = [{"B": 8, "C": 512, "H": s, "W": s} for s in (64, 96, 129)]
QUICK = [{"B": 8, "C": 512, "H": 64, "W": 64}]
SMOKE = [{"B": 2, "C": 8, "H": 5, "W": 5}]
STRIDE = 2


class FPAKVStrideSuite(Suite):
    name = "fpa_kv_stride"
    title = f"FPA with kv_stride={STRIDE} against exact FPA"
    impls = ("pooled", "exact")
    impl_labels = {
        "pooled": f"`ForegroundPrototypeAttention(C, kv_stride={STRIDE})`: keys and values averaged over 2 × 2 windows",
        "exact": "`ForegroundPrototypeAttention(C)`: every pixel attends to every partner pixel (the paper)",
    }
    notes = (
        "Training-mode pairing of the batch halves, `values=\"self\"`, `key_channels = C // 2`, gradients to x and "
        "all parameters; the same weights and input on both sides.",
    )

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "smoke":
            return [Series("forward+backward", "float32", SMOKE)]
        if mode == "quick":
            return [Series("forward+backward", "float32", QUICK, memory=False)]
        if mode == "paper":
            return [Series("forward+backward", dtype, [PAPER]) for dtype in ("float32", "bfloat16")]
        return [Series("forward+backward", dtype, FULL_CUDA if device == "cuda" else FULL)
                for dtype in default_dtypes(device, mode)]

    def build(self, case: Case, device: torch.device) -> Runner:
        layer, x, gen = fpa_layer_and_input(case, device, kv_stride=STRIDE if case.impl == "pooled" else 1)
        grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)
        return forward_or_backward(lambda: layer(x), x, list(layer.parameters()), grad, backward=True)

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        return 10 * s["B"] * s["C"] * s["H"] * s["W"] * itemsize(case.dtype)

    def work(self, case: Case) -> float:
        s = case.sizes
        n = s["H"] * s["W"]
        keys = n // (STRIDE * STRIDE) if case.impl == "pooled" else n
        return float(s["B"] * n * (keys * max(1, s["C"] // 2) + s["C"] * s["C"]))

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"B": 2, "C": 8, "H": 4, "W": 4})
