"""Confidence masking: ``confidence_mask`` (vectorised) against the per-patch Python loop.

Probabilities of K = 2 classes at the image resolution with one foreground blob per image
plus smooth noise, the paper's 57-pixel patches (a 9 x 9 grid at 513), k = 0.7, r = 0.7, and a
freshly seeded generator per call, so both sides draw the same random numbers and give the
same mask.
"""

from __future__ import annotations

import importlib

import torch
import torch.nn.functional as F

from benchmarks.harness import DTYPES, Case, Runner, Series, Suite, default_dtypes, itemsize

FULL = [{"B": 4, "K": 2, "H": s, "W": s} for s in (129, 257, 513)] + [{"B": 8, "K": 2, "H": 513, "W": 513}]
QUICK = [{"B": 4, "K": 2, "H": 513, "W": 513}]
SMOKE = [{"B": 2, "K": 2, "H": 20, "W": 20}]
PATCH = {"full": 57, "quick": 57, "smoke": 7, "paper": 57}


def blob_probs(b: int, k: int, h: int, w: int, gen: torch.Generator) -> torch.Tensor:
    """(B, K, H, W) softmax probabilities: a central disk of foreground plus smooth noise."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    disk = 4 * (0.35 - (yy**2 + xx**2).sqrt())  # (H, W), > 0 inside a disk of radius 0.35
    noise = F.interpolate(torch.randn(b, k, 17, 17, generator=gen), size=(h, w), mode="bilinear", align_corners=False)
    logits = 2 * noise  # (B, K, H, W)
    logits[:, 1:] += disk  # classes 1.. are foreground
    return logits.softmax(dim=1)


class MaskingSuite(Suite):
    name = "masking"
    title = "Confidence-based masking"
    impl_labels = {
        "fast": "`confidence_mask` (vectorised patch statistics)",
        "reference": "`_reference.confidence_mask.confidence_mask_loop` (Python loop over images and patches)",
    }
    notes = ("patch_size 57 (7 in the smoke test), keep_hard 0.7, mask_ratio 0.7; the mask only, no image fill.",)

    def available(self) -> str | None:
        try:
            importlib.import_module("cscpa_layers._reference.confidence_mask")
            getattr(importlib.import_module("cscpa_layers"), "confidence_mask")
        except (ImportError, AttributeError) as error:
            return f"confidence_mask is not in this checkout yet ({error})"
        return None

    def plan(self, device: str, mode: str) -> list[Series]:
        sizes = {"full": FULL, "quick": QUICK, "smoke": SMOKE, "paper": FULL[-2:]}[mode]
        sizes = [dict(s, patch=PATCH[mode]) for s in sizes]
        return [Series("mask", dtype, sizes, memory=mode != "quick") for dtype in default_dtypes(device, mode)]

    def build(self, case: Case, device: torch.device) -> Runner:
        from cscpa_layers import confidence_mask
        from cscpa_layers._reference.confidence_mask import confidence_mask_loop

        s = case.sizes
        probs = blob_probs(s["B"], s["K"], s["H"], s["W"], torch.Generator().manual_seed(0))
        probs = probs.to(device=device, dtype=DTYPES[case.dtype])
        mask_fn = confidence_mask if case.impl == "fast" else confidence_mask_loop

        def run() -> object:
            generator = torch.Generator(device=device).manual_seed(1)
            return mask_fn(probs, patch_size=s["patch"], keep_hard=0.7, mask_ratio=0.7, generator=generator)

        return run

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        return 8.0 * s["B"] * s["K"] * s["H"] * s["W"] * max(itemsize(case.dtype), 8)

    def work(self, case: Case) -> float:
        s = case.sizes
        return float(s["B"] * s["K"] * s["H"] * s["W"])

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"B": 1, "K": 2, "H": 8, "W": 8, "patch": 4})
