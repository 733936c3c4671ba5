"""FPA with ``kv_stride=2`` (keys and values from 2 x 2 windows) against exact FPA.

The option exists for large crops, where exact FPA's N² attention costs more than the rest of
the network. This suite measures what it saves; its effect on Dice is a training question,
measured in docs/results.md, not here.
"""

from __future__ import annotations

import torch

from benchmarks.harness import DTYPES, PAPER, Case, Runner, Series, Suite, default_dtypes, itemsize
from cscpa_layers import ForegroundPrototypeAttention

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
        s = case.sizes
        dtype = DTYPES[case.dtype]
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        stride = STRIDE if case.impl == "pooled" else 1
        layer = ForegroundPrototypeAttention(s["C"], kv_stride=stride).to(device=device, dtype=dtype).train()
        x = torch.randn(s["B"], s["C"], s["H"], s["W"], generator=gen).to(device=device, dtype=dtype)
        grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
        params = list(layer.parameters())
        x.requires_grad_(True)

        def run() -> object:
            x.grad = None
            for p in params:
                p.grad = None
            layer(x).backward(grad)
            return None

        return run

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
