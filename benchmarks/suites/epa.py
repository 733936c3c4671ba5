"""EPA: edge prototype attention, the container update and the edge mask against the literal forms.

- "forward" / "forward+backward": :func:`edge_prototype_attention` against
  ``edge_prototype_attention_dense`` (normalised copy of F, explicit softmax and outer product).
- "container update": :meth:`AdaptiveEdgeContainer.update` (draw, stack, mixer, store) against
  the same draw followed by ``container_update_dense`` (Eq. 7 as an einsum) and the same store.
- "edge mask": :func:`edge_mask` (two max-pools) against ``edge_mask_dense`` (a Python loop over
  every pixel and its 8 neighbours), on disk-shaped lesion masks.
"""

from __future__ import annotations

import torch

from benchmarks.harness import DTYPES, Case, Runner, Series, Suite, default_dtypes, disk_labels, itemsize
from cscpa_layers import AdaptiveEdgeContainer, edge_mask, edge_prototype_attention
from cscpa_layers._reference.edge_attention import (
    container_update_dense,
    edge_mask_dense,
    edge_prototype_attention_dense,
)

ATTENTION = {
    "full": [{"B": 8, "C": 512, "H": s, "W": s} for s in (16, 32, 64, 129)],
    "quick": [{"B": 2, "C": 512, "H": 129, "W": 129}],
    "smoke": [{"B": 2, "C": 8, "H": 4, "W": 4}],
    "paper": [{"B": 8, "C": 512, "H": 129, "W": 129}],
}
UPDATE = {
    "full": [{"slots": 64, "C": 128, "m": 128}, {"slots": 256, "C": 512, "m": 512}, {"slots": 1024, "C": 512, "m": 2048}],
    "quick": [{"slots": 256, "C": 512, "m": 512}],
    "smoke": [{"slots": 4, "C": 8, "m": 8}],
    "paper": [{"slots": 256, "C": 512, "m": 512}],
}
MASK = {
    "full": [{"B": 2, "H": 16, "W": 16}, {"B": 8, "H": 32, "W": 32}, {"B": 8, "H": 64, "W": 64}, {"B": 8, "H": 129, "W": 129}],
    "quick": [{"B": 8, "H": 32, "W": 32}],
    "smoke": [{"B": 1, "H": 5, "W": 5}],
    "paper": [{"B": 2, "H": 32, "W": 32}],  # the reference is a Python loop over pixels: kept small
}


class EPASuite(Suite):
    name = "epa"
    title = "EPA: edge prototype attention, container update, edge mask"
    impl_labels = {
        "fast": "`edge_prototype_attention`, `AdaptiveEdgeContainer.update`, `edge_mask`",
        "reference": "`_reference.edge_attention`: `edge_prototype_attention_dense`, draw + `container_update_dense`, `edge_mask_dense` (per-pixel loop)",
    }
    notes = (
        "forward: under `torch.no_grad()`; forward+backward: gradients to the features and the prototype.",
        "container update: `slots` rows drawn from `m` candidates, in the graph through the mixer (no backward).",
        "edge mask: integer labels, so one dtype only.",
    )

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "quick":  # every op once; no EPA target is about memory, so no subprocesses
            return [
                Series("forward", "float32", ATTENTION[mode], memory=False),
                Series("forward+backward", "float32", ATTENTION[mode], memory=False),
                Series("forward+backward", "bfloat16", ATTENTION[mode], memory=False),
                Series("container update", "float32", UPDATE[mode], memory=False),
                Series("edge mask", "int64", MASK[mode], memory=False),
            ]
        dtypes = default_dtypes(device, mode)
        ops = ["forward", "forward+backward"] if mode != "smoke" else ["forward+backward"]
        plan = [Series(op, dtype, ATTENTION[mode]) for dtype in dtypes for op in ops]
        plan += [Series("container update", dtype, UPDATE[mode]) for dtype in dtypes]
        plan.append(Series("edge mask", "int64", MASK[mode]))
        return plan

    def build(self, case: Case, device: torch.device) -> Runner:
        if case.op == "container update":
            return self._build_update(case, device)
        if case.op == "edge mask":
            labels = disk_labels(case.sizes["B"], case.sizes["H"], case.sizes["W"], device)
            mask_fn = edge_mask if case.impl == "fast" else edge_mask_dense
            return lambda: mask_fn(labels)
        s = case.sizes
        dtype = DTYPES[case.dtype]
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(s["B"], s["C"], s["H"], s["W"], generator=gen).to(device=device, dtype=dtype)
        prototype = torch.randn(s["C"], generator=gen).to(device=device, dtype=dtype)
        grad = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype)
        attention = edge_prototype_attention if case.impl == "fast" else edge_prototype_attention_dense
        backward = case.op == "forward+backward"
        x.requires_grad_(backward)
        prototype.requires_grad_(backward)

        def run() -> object:
            if not backward:
                with torch.no_grad():
                    return attention(x, prototype)
            x.grad = prototype.grad = None
            attention(x, prototype).backward(grad)
            return None

        return run

    def _build_update(self, case: Case, device: torch.device) -> Runner:
        s = case.sizes
        dtype = DTYPES[case.dtype]
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        container = AdaptiveEdgeContainer(s["C"], slots=s["slots"]).to(device=device, dtype=dtype)
        container.initialize(torch.randn(s["slots"], s["C"], generator=gen).to(device=device, dtype=dtype), generator=gen)
        candidates = torch.randn(s["m"], s["C"], generator=gen).to(device=device, dtype=dtype)
        draw = torch.Generator(device=device).manual_seed(1)
        if case.impl == "fast":
            return lambda: container.update(candidates, generator=draw)

        def reference() -> object:
            index = torch.randperm(s["m"], generator=draw, device=device)[: s["slots"]]  # m >= slots here
            bank = container_update_dense(
                candidates[index].detach(), container.bank, container.mixer.weight, container.mixer.bias
            )
            with torch.no_grad():
                container.bank.copy_(bank)
            return bank

        return reference

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        if case.op == "container update":
            return 8.0 * s["slots"] * s["C"] * itemsize(case.dtype) + 2 * s["slots"] ** 2 * 4
        if case.op == "edge mask":
            return 8.0 * s["B"] * s["H"] * s["W"] * 8
        return 8.0 * s["B"] * s["C"] * s["H"] * s["W"] * max(itemsize(case.dtype), 4)

    def work(self, case: Case) -> float:
        s = case.sizes
        if case.op == "container update":
            return float(s["slots"] * s["C"] * (2 * s["slots"] + 1) + s["m"])
        if case.op == "edge mask":
            return float(s["B"] * s["H"] * s["W"])
        return float(s["B"] * s["C"] * s["H"] * s["W"])

    def formula_flops(self, case: Case) -> float | None:
        """Eqs. 9-10 per pixel: cosine to P_e (dot and norm, 4·C) and adding Φ·P_e (2·C); backward 2x.

        The container update and the edge mask keep the counter's number (matmuls; none).
        """
        if case.op not in ("forward", "forward+backward"):
            return None
        s = case.sizes
        forward = 6.0 * s["B"] * s["C"] * s["H"] * s["W"]
        return forward * (3 if case.op == "forward+backward" else 1)

    def tiny(self, case: Case) -> Case:
        small = {
            "container update": {"slots": 4, "C": 8, "m": 8},
            "edge mask": {"B": 1, "H": 5, "W": 5},
        }.get(case.op, {"B": 2, "C": 8, "H": 4, "W": 4})
        return Case(case.suite, case.op, case.impl, case.dtype, small)
