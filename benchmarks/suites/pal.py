"""PAL: PixelAffinityLoss against the dense Eqs. 12-14 (8 shifted copies of F in memory).

Two forms, both forward+backward with the gradient to the features:

- "GT": ground-truth targets, G(p) the mean of the neighbour signs;
- "pseudo-labels": a confidence map (pixels below τ = 0.8 excluded) and detached target
  features whose cosines weight the target side.
"""

from __future__ import annotations

import importlib

import torch

from benchmarks.harness import DTYPES, PAPER, Case, Runner, Series, Suite, default_dtypes, disk_labels, itemsize

FULL = [{"B": 8, "C": 512, "H": s, "W": s} for s in (16, 32, 64, 96, 129)]
QUICK = [{"B": 4, "C": 512, "H": 64, "W": 64}]  # the paper's width at the target's N
SMOKE = [{"B": 2, "C": 8, "H": 5, "W": 5}]
OPS = ("forward+backward (GT)", "forward+backward (pseudo-labels)")


class PALSuite(Suite):
    name = "pal"
    title = "PAL: pixel affinity loss"
    impl_labels = {
        "fast": "`PixelAffinityLoss` (shifted views, recomputing backward)",
        "reference": "`_reference.affinity_loss.pixel_affinity_loss_dense` (8 shifted copies)",
    }
    notes = (
        "Disk-shaped lesion targets; pseudo-label form: confidence uniform in [0.5, 1] (about 40% of the pixels "
        "below τ = 0.8 drop out) and random target features.",
        "forward+backward: the loss (mean reduction) and its gradient to the features.",
    )

    def formula_flops(self, case: Case) -> float | None:
        """PAL's cosines are elementwise products, which the counter does not see.

        The arithmetic of Eqs. 12-14: per pixel one norm and 8 neighbour dot products over C
        channels (2·C FLOPs each), forward; backward as twice the forward. The same count for
        both sides, so their GFLOP/s compare like with like.
        """
        s = case.sizes
        return 3.0 * 9 * 2 * s["C"] * s["B"] * s["H"] * s["W"]

    def available(self) -> str | None:
        try:
            importlib.import_module("cscpa_layers._reference.affinity_loss")
            getattr(importlib.import_module("cscpa_layers"), "PixelAffinityLoss")
        except (ImportError, AttributeError) as error:
            return f"PixelAffinityLoss is not in this checkout yet ({error})"
        return None

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "smoke":
            return [Series(OPS[0], "float32", SMOKE)]
        if mode == "quick":  # the target's size (N = 64²) only
            return [Series(OPS[0], "float32", QUICK), Series(OPS[1], "float32", QUICK), Series(OPS[0], "bfloat16", QUICK)]
        if mode == "paper":
            return [Series(op, dtype, [PAPER]) for dtype in ("float32", "bfloat16") for op in OPS]
        return [Series(op, dtype, FULL) for dtype in default_dtypes(device, mode) for op in OPS]

    def build(self, case: Case, device: torch.device) -> Runner:
        from cscpa_layers import PixelAffinityLoss
        from cscpa_layers._reference.affinity_loss import pixel_affinity_loss_dense

        s = case.sizes
        dtype = DTYPES[case.dtype]
        gen = torch.Generator().manual_seed(0)
        features = torch.randn(s["B"], s["C"], s["H"], s["W"], generator=gen).to(device=device, dtype=dtype)
        features.requires_grad_(True)
        target = disk_labels(s["B"], s["H"], s["W"], device)
        confidence = target_features = None
        if case.op.endswith("(pseudo-labels)"):
            confidence = (0.5 + 0.5 * torch.rand(s["B"], s["H"], s["W"], generator=gen)).to(device=device, dtype=dtype)
            target_features = torch.randn(features.shape, generator=gen).to(device=device, dtype=dtype)
        loss_fn = PixelAffinityLoss()

        def run() -> object:
            features.grad = None
            if case.impl == "fast":
                loss = loss_fn(features, target, confidence=confidence, target_features=target_features)
            else:
                loss = pixel_affinity_loss_dense(features, target, confidence, target_features)
            loss.backward()
            return None

        return run

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        feature_map = s["B"] * s["C"] * s["H"] * s["W"] * max(itemsize(case.dtype), 4)
        # 8 shifted copies, their products and autograd's copies for the reference; the layer
        # needs about one extra map (measured ~1 at 64², rounded up).
        return (24 if case.impl == "reference" else 4) * feature_map

    def work(self, case: Case) -> float:
        s = case.sizes
        return float(s["B"] * s["C"] * s["H"] * s["W"])

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"B": 1, "C": 4, "H": 4, "W": 4})
