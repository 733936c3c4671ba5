"""FPA against its own limit: bare ``scaled_dot_product_attention`` on the q, k, v FPA builds.

The dense comparison (suite ``fpa``) shows the memory FPA saves; both sides do the same N²·d
attention work, so it says little about speed. The limit that matters is the attention call
alone: FPA adds the prototypes, the token projections and the output projection around it,
which grow with N while the attention grows with N². Here the baseline runs the attention
call of FPA's ``kernel="sdpa"``, forward and backward, on detached copies of the q, k and v
that the layer computes for the same input, so the ratio is what FPA costs on top of that
call. The ``fpa`` side is the layer with its default ``kernel="auto"``, which on CPU shares
one score matrix between the two directions of a pair (fewer FLOPs than the baseline).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from benchmarks.harness import PAPER, Case, Runner, Series, Suite, default_dtypes, itemsize
from benchmarks.suites.fpa import forward_or_backward, fpa_layer_and_input
from cscpa_layers._prototype_tokens import prototype_tokens

# Ascending cost; the paper's batch at the target's N = 64², then B = 2 up to 129² (at B = 8 one
# CPU forward+backward at 129² does ~8 TFLOP of attention, minutes per run on two cores).
FULL = [{"B": 2, "C": 512, "H": 64, "W": 64}, {"B": 8, "C": 512, "H": 64, "W": 64},
        {"B": 2, "C": 512, "H": 96, "W": 96}, {"B": 2, "C": 512, "H": 129, "W": 129}]
FULL_CUDA = [{"B": 8, "C": 512, "H": s, "W": s} for s in (64, 96, 129)]
QUICK = [{"B": 2, "C": 512, "H": 64, "W": 64}, {"B": 8, "C": 512, "H": 64, "W": 64}]
SMOKE = [{"B": 2, "C": 8, "H": 4, "W": 4}]


class FPAvsSDPASuite(Suite):
    name = "fpa_sdpa"
    title = "FPA against bare SDPA on the same q, k, v"
    impls = ("fpa", "sdpa")
    impl_labels = {
        "fpa": "`ForegroundPrototypeAttention`, training-mode pairing of the batch halves, gradients to x and all parameters",
        "sdpa": "`F.scaled_dot_product_attention` alone on FPA's own q, k, v (B, 1, N, d), gradients to q, k, v",
    }
    ratio = "overhead"
    notes = (
        "`values=\"self\"`, `key_channels = C // 2`; q, k, v are the layer's tokens for the same seeded input, detached.",
        "The FLOP floor is FPA's FLOPs over the attention's: the overhead its prototypes and projections explain.",
    )

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "smoke":
            return [Series("forward+backward", "float32", SMOKE)]
        if mode == "quick":
            return [Series("forward+backward", "float32", QUICK, memory=False)]
        if mode == "paper":
            return [Series(op, dtype, [PAPER], memory=False) for dtype in ("float32", "bfloat16")
                    for op in ("forward", "forward+backward")]
        sizes = FULL_CUDA if device == "cuda" else FULL
        return [Series(op, dtype, sizes, memory=False) for dtype in default_dtypes(device, mode)
                for op in ("forward", "forward+backward")]

    def build(self, case: Case, device: torch.device) -> Runner:
        s = case.sizes
        layer, x, gen = fpa_layer_and_input(case, device)
        backward = case.op == "forward+backward"
        if case.impl == "fpa":
            grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)
            return forward_or_backward(lambda: layer(x), x, list(layer.parameters()), grad, backward)
        with torch.no_grad():  # the very q, k, v FPA's attention call sees (halves paired by a roll)
            query, value = prototype_tokens(
                x.flatten(2), layer.key.weight, layer.key.bias, layer.value.weight, layer.value.bias, layer.eps
            )
            key = query.roll(s["B"] // 2, dims=0)
        q, k, v = (t.unsqueeze(1).contiguous().requires_grad_(backward) for t in (query, key, value))
        grad_out = torch.randn(q.shape, generator=gen).to(device=device, dtype=x.dtype)
        return forward_or_backward(lambda: F.scaled_dot_product_attention(q, k, v), q, [k, v], grad_out, backward)

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        return 10 * s["B"] * s["C"] * s["H"] * s["W"] * itemsize(case.dtype)  # as FPA in suite fpa

    def work(self, case: Case) -> float:
        s = case.sizes
        n = s["H"] * s["W"]
        d = max(1, s["C"] // 2)
        return float(s["B"] * n * (n * d + (s["C"] * s["C"] if case.impl == "fpa" else 0)))

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"B": 2, "C": 8, "H": 4, "W": 4})
