"""One full training iteration of the reference DeepLabv3+: CSC-PA against the same steps without it.

- **cscpa**: ``DeepLabV3Plus(fpa=True, epa=True)`` and ``CSCPAStep.train_step`` with PAL and
  confidence masking on: stage 1 on [x_l, x_u], pseudo-labels, masking, edge candidates and the
  container update, stage 2 on [x_l, x_m]; two SGD steps.
- **plain**: ``DeepLabV3Plus(fpa=False, epa=False)`` and the same ``train_step`` with
  ``pal=False, masking=False``: the same two forward/backward passes and SGD steps with CE on
  the labeled images and the pseudo-labels, nothing of CSC-PA.

The ratio cscpa / plain is the overhead of the method's parts. The models start from random
weights (``pretrained=False``) on random images with disk-shaped lesion labels; the edge
container is initialised and the optimiser's momentum buffers exist before the measured call,
so the timed iteration is a steady-state one. bfloat16 and float16 run under ``torch.autocast``
(float16 with a ``GradScaler``), float32 without.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from benchmarks.harness import Case, Runner, Series, Suite, default_dtypes, disk_labels

CPU_CONFIG = {"resnet": 18, "crop": 128, "B_l": 2, "B_u": 2}  # the CPU config of the overhead target
FULL = [
    CPU_CONFIG,
    {"resnet": 18, "crop": 160, "B_l": 2, "B_u": 2},
    {"resnet": 50, "crop": 257, "B_l": 2, "B_u": 2},
    {"resnet": 50, "crop": 513, "B_l": 4, "B_u": 4},  # the paper's
]
SMOKE = [{"resnet": 18, "crop": 32, "B_l": 1, "B_u": 1}]


class IterationSuite(Suite):
    name = "iteration"
    title = "One training iteration of the reference DeepLabv3+ (CSC-PA overhead)"
    impls = ("cscpa", "plain")
    impl_labels = {
        "cscpa": "DeepLabV3Plus with FPA + EPA, `CSCPAStep.train_step` with PAL and masking (two stages, container update)",
        "plain": "DeepLabV3Plus without FPA and EPA, the same `train_step` with `pal=False, masking=False`",
    }
    ratio = "overhead"
    notes = (
        "Output stride 8, F of 512 channels at stride 4; SGD (lr 0.003, momentum 0.9, weight decay 5e-4); "
        "masking patch = crop // 9 (the paper's 9 × 9 grid); halfway through training (epoch 100 of 200).",
        f"The CPU config of the overhead target: ResNet-{CPU_CONFIG['resnet']}, crop {CPU_CONFIG['crop']}, "
        f"batch {CPU_CONFIG['B_l']} labeled + {CPU_CONFIG['B_u']} unlabeled.",
    )

    def available(self) -> str | None:
        try:
            importlib.import_module("examples.models.deeplab")
            importlib.import_module("examples.engine.step")
        except ImportError as error:
            return f"the reference model or the CSC-PA step is not in this checkout yet ({error})"
        return None

    def plan(self, device: str, mode: str) -> list[Series]:
        if mode == "smoke":
            return [Series("iteration", "float32", SMOKE)]
        if mode == "quick":
            return [Series("iteration", "float32", [CPU_CONFIG])]
        if mode == "paper":
            return [Series("iteration", dtype, FULL[-1:]) for dtype in ("float32", "bfloat16")]
        return [Series("iteration", dtype, FULL) for dtype in default_dtypes(device, mode)]

    def build(self, case: Case, device: torch.device) -> Runner:
        from examples.engine.cscpa_step import CSCPAStep
        from examples.engine.step import CSCPAOptions
        from examples.models.deeplab import DeepLabV3Plus

        s = case.sizes
        full = case.impl == "cscpa"
        torch.manual_seed(0)
        model = DeepLabV3Plus(
            2, backbone=f"resnet{s['resnet']}", output_stride=8, pretrained=False, fpa=full, epa=full
        ).to(device)
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9, weight_decay=5e-4)
        _create_momentum(optimizer)
        container = model.epa.container if model.epa is not None else None
        gen = torch.Generator().manual_seed(0)
        if container is not None:
            container.initialize(torch.randn(container.slots, container.channels, generator=gen).to(device))
        crop, b_l, b_u = s["crop"], s["B_l"], s["B_u"]
        x_l = torch.randn(b_l, 3, crop, crop, generator=gen).to(device)
        x_u = torch.randn(b_u, 3, crop, crop, generator=gen).to(device)
        y_l = disk_labels(b_l, crop, crop, device)
        options = CSCPAOptions(pal=full, masking=full, patch_size=max(1, crop // 9))
        kwargs: dict[str, Any] = {}
        if case.dtype != "float32":
            dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}[case.dtype]
            kwargs["autocast"] = lambda: torch.autocast(device.type, dtype=dtype)
            if case.dtype == "float16":
                kwargs["scaler"] = torch.amp.GradScaler(device.type)
        step = CSCPAStep(model, optimizer, container=container, options=options, **kwargs)
        draw = torch.Generator(device=device).manual_seed(1)

        def run() -> object:
            return step.train_step(x_l, y_l, x_u, epoch=100, epochs=200, generator=draw)  # halfway

        return run

    def estimate_bytes(self, case: Case) -> float:
        s = case.sizes
        # Measured: ~3.7 KB of extra peak per input pixel for ResNet-18 (356 MiB at crop 160,
        # 2 + 2 images); twice that as the guard, and three times more for ResNet-50.
        per_pixel = 8000.0 if s["resnet"] < 50 else 24000.0
        return per_pixel * (s["B_l"] + s["B_u"]) * s["crop"] ** 2

    def work(self, case: Case) -> float:
        s = case.sizes
        return float((s["B_l"] + s["B_u"]) * s["crop"] ** 2 * (3 if s["resnet"] >= 50 else 1))

    def tiny(self, case: Case) -> Case:
        return Case(case.suite, case.op, case.impl, case.dtype, {"resnet": case.sizes["resnet"], "crop": 32, "B_l": 1, "B_u": 1})


def _create_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Allocate SGD's momentum buffers now, so the measured call is a steady-state step.

    A step with zero gradients initialises the buffers to zero; weight decay moves each
    parameter by lr · wd · p, which does not matter for a benchmark.
    """
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
