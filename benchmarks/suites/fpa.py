"""FPA: ForegroundPrototypeAttention against the dense Eqs. 1-6 (N x N matrix in memory).

Both run in training mode on a batch whose halves are paired (``partner=None``), with the
layer's own parameters, so they compute the same function. "forward" runs under
``torch.no_grad()`` (inference cost); "forward+backward" runs with gradients to the input
and the parameters, the cost of a training step's FPA.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from benchmarks.harness import DTYPES, PAPER, Case, Runner, Series, Suite, default_dtypes, itemsize
from cscpa_layers import ForegroundPrototypeAttention
from cscpa_layers._reference.prototype_attention import foreground_prototype_attention_dense

FULL = [{"B": 8, "C": 512, "H": s, "W": s} for s in (16, 32, 64, 96, 129)]
SMALL = {"B": 2, "C": 512, "H": 32, "W": 32}
TARGET = {"B": 8, "C": 512, "H": 64, "W": 64}  # the paper's batch and widths at the target's N = 64²
HALF = {"B": 2, "C": 512, "H": 64, "W": 64}
SMOKE = [{"B": 2, "C": 8, "H": 4, "W": 4}]


def fpa_layer_and_input(
    case: Case, device: torch.device, **options: object
) -> tuple[ForegroundPrototypeAttention, torch.Tensor, torch.Generator]:
    """The seeded FPA layer (training mode, ``options`` to its constructor) and input of a case.

    Returns the generator too: a suite draws its upstream gradient from it next, so every FPA
    suite sees the same layer, input and gradient for the same sizes.
    """
    s = case.sizes
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    layer = ForegroundPrototypeAttention(s["C"], **options).to(device=device, dtype=dtype).train()  # type: ignore[arg-type]
    x = torch.randn(s["B"], s["C"], s["H"], s["W"], generator=gen).to(device=device, dtype=dtype)
    return layer, x, gen


def forward_or_backward(
    call: Callable[[], torch.Tensor], x: torch.Tensor, params: list[torch.Tensor], grad: torch.Tensor, backward: bool
) -> Runner:
    """One measured call: ``call()`` under no_grad, or ``call().backward(grad)`` with the
    gradients of ``x`` (made to require one) and ``params`` cleared first."""
    x.requires_grad_(backward)

    def run() -> object:
        if not backward:
            with torch.no_grad():
                return call()
        for t in (x, *params):
            t.grad = None
        call().backward(grad)
        return None

    return run


class FPASuite(Suite):
    name = "fpa"
    title = "FPA: foreground prototype attention"
    impl_labels = {
        "fast": "`ForegroundPrototypeAttention` (SDPA, no N×N, recomputing backward)",
        "reference": "`_reference.prototype_attention.foreground_prototype_attention_dense` (N×N in memory)",
    }
    notes = (
        "Training-mode pairing of the batch halves, `values=\"self\"`, `key_channels = C // 2`.",
        "forward: under `torch.no_grad()`; forward+backward: gradients to the input and all parameters.",
    )

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "smoke":
            return [Series("forward+backward", "float32", SMOKE)]
        if mode == "quick":  # every op and dtype once, the target at the paper's batch; memory where a target needs it
            return [
                Series("forward", "float32", [HALF], memory=False),
                Series("forward+backward", "float32", [SMALL, TARGET]),
                Series("forward+backward", "bfloat16", [HALF]),
            ]
        if mode == "paper":  # the dense side holds ~40 GB at float32: it runs where the memory guard lets it
            return [Series("forward+backward", dtype, [PAPER]) for dtype in ("float32", "bfloat16")]
        return [Series(op, dtype, FULL) for dtype in default_dtypes(device, mode) for op in ("forward", "forward+backward")]

    def build(self, case: Case, device: torch.device) -> Runner:
        layer, x, gen = fpa_layer_and_input(case, device)
        grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=x.dtype)

        def call() -> torch.Tensor:
            if case.impl == "fast":
                return layer(x)
            return foreground_prototype_attention_dense(
                x,
                None,
                layer.key.weight,
                layer.key.bias,
                layer.value.weight,
                layer.value.bias,
                layer.out.weight,
                layer.out.bias,
            )

        return forward_or_backward(call, x, list(layer.parameters()), grad, case.op == "forward+backward")

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        n = s["H"] * s["W"]
        feature_map = s["B"] * s["C"] * n * itemsize(case.dtype)
        # Measured on CPU at B=8, C=512, 64²: the layer ~6 feature maps, the reference ~4.2
        # (B, N, N) float32 matrices in forward+backward; both rounded up generously.
        fast = 10 * feature_map
        if case.impl == "fast":
            return fast
        per_matrix = s["B"] * n * n * max(itemsize(case.dtype), 4)
        return fast + (5 if case.op == "forward+backward" else 2.5) * per_matrix

    def work(self, case: Case) -> float:
        s = case.sizes
        n = s["H"] * s["W"]
        d = max(1, s["C"] // 2)
        return float(s["B"] * n * (n * d + s["C"] * s["C"]))

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"B": 2, "C": 8, "H": 4, "W": 4})
