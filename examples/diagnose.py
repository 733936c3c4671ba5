"""Look inside a CSC-PA checkpoint: what EPA, FPA and the pseudo-labels do to this model.

    python -m examples.diagnose runs/busi/cscpa/fold0/last.pt
    python -m examples.diagnose runs/busi/cscpa/fold0/last.pt --batches 20 --json diag.json

It rebuilds the model and the fold's data from the configuration stored in the checkpoint
(``last.pt`` or ``best.pt`` of ``examples/train_busi.py``) and reports:

1. **Validation Dice and IoU** as trained, with EPA switched off (the stored bank ignored),
   with FPA's eval pairing swapped (``self`` / ``identity``), and after the BatchNorm running
   statistics are re-estimated on ``--batches`` batches of the method's stage-1 input, as the
   trainer's ``--precise-bn`` does. A gap between "as trained" and "BN re-estimated" means the
   running statistics lag the features (for example while EPA's term changes size).
   ``--test`` also scores the test split both ways.
2. **EPA's size**: the norm of F_e against the norm of F on the validation images.
3. **Pseudo-label quality** on ``--batches`` batches of the fold's unlabeled images, whose
   masks the dataset has even though training does not use them: the share of pixels above
   the confidence threshold, how many of them are labelled lesion, their lesion precision and
   recall, and how much of the true lesion the threshold keeps. The forward is stage 1's:
   training mode, [labeled, unlabeled] in one batch, no gradient, on a copy of the model.
4. ``--by-lesion-kind`` (the phantom with ``--phantom-hyperechoic``): the same forward on every
   unlabeled image, whole and at the evaluation size, beside as many labeled images as the run's
   batch, scored at full resolution separately on the bright (hyperechoic) lesion, the dark
   lesion and the background pixels: the share predicted lesion, labelled lesion with confidence
   >= tau and labelled background with confidence >= tau (what stage 2 then teaches; the
   confidence threshold of the run, whatever its ``--reliability`` rule).

Everything runs on the CPU (a few minutes at BUSI sizes). Nothing is written to the checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import argparse
import contextlib
import copy
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cscpa_layers import pseudo_labels
from examples.engine.evaluate import evaluate
from examples.data.samples import IGNORE_INDEX
from examples.engine.streams import IndexStream, StreamBatches
from examples.data.folds import fold_data, open_dataset
from examples.data.phantom_dataset import PhantomDataset
from examples.data.transforms import EvalTransform
from examples.engine.batchnorm import reestimate_bn
from examples.engine.checkpoint import read_checkpoint
from examples.engine.config import TrainConfig
from examples.engine.step import step_classes
from examples.engine.streams import loader
from examples.models.deeplab import DeepLabV3Plus
from examples.models.trained import trained_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path, help="last.pt or best.pt written by examples/train_busi.py")
    parser.add_argument("--data", help="dataset to use instead of the one stored in the checkpoint")
    parser.add_argument("--split", help="split file to use instead of the one stored in the checkpoint")
    parser.add_argument("--batches", type=int, default=20,
                        help="training batches for the BN re-estimate and the pseudo-label statistics (default 20)")
    parser.add_argument("--test", action="store_true", help="also score the test split, as trained and with BN re-estimated")
    parser.add_argument("--by-lesion-kind", action="store_true",
                        help="hyperechoic phantom only: pseudo-label figures split into bright and dark lesions")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error(f"--batches must be at least 1, got {args.batches}")
    return args


@contextlib.contextmanager
def epa_off(model: nn.Module) -> Iterator[None]:
    """EPA's stored bank ignored: ``forward(x)`` returns x while ``initialized`` is False."""
    epa = getattr(model, "epa", None)
    if epa is None:
        yield
        return
    saved = epa.container.initialized.clone()
    epa.container.initialized.fill_(False)
    try:
        yield
    finally:
        epa.container.initialized.copy_(saved)


def training_batches(config: TrainConfig, data: Any, count: int) -> Iterator[tuple[Any, Any]]:
    """``count`` stage-1 batches of (labeled, unlabeled), from streams of their own."""
    labeled = IndexStream(len(data.labeled), seed=config.seed + 1, tag="diagnose-labeled")
    unlabeled = IndexStream(len(data.unlabeled), seed=config.seed + 1, tag="diagnose-unlabeled")
    yield from zip(
        loader(data.labeled, StreamBatches(labeled, 0, count, config.batch), 0),
        loader(data.unlabeled, StreamBatches(unlabeled, 0, count, config.batch), 0),
    )


def reestimated(model: nn.Module, config: TrainConfig, batches: list[tuple[Any, Any]]) -> nn.Module:
    """A copy of the model with BatchNorm statistics re-estimated as ``--precise-bn`` does:
    on the method's stage-1 input ([labeled, unlabeled] for CSC-PA, labeled for SupOnly)."""
    model = copy.deepcopy(model)
    step = step_classes()[config.method]
    reestimate_bn(model, (step.stage1_input(l.image, u.image) for l, u in batches))
    return model.eval()


@torch.no_grad()
def epa_size(model: Any, data: Any) -> float | None:
    """Mean over validation images of |F_e| / |F|, per pixel norms averaged over pixels."""
    epa = getattr(model, "epa", None)
    if epa is None or not bool(epa.container.initialized):
        return None
    model.eval()
    ratios = []
    for index in range(len(data.val)):
        x = data.val[index].image[None]
        feats = model.decoder_features(x)
        f_e = epa(feats, residual=False)  # F_e alone
        ratios.append((f_e.norm(dim=1).mean() / feats.norm(dim=1).mean()).item())
    return sum(ratios) / len(ratios)


@torch.no_grad()
def pseudo_label_quality(model: nn.Module, batches: list[tuple[Any, Any]], threshold: float) -> dict[str, float]:
    """Stage 1's pseudo-labels on unlabeled images scored against their true masks."""
    model = copy.deepcopy(model).train()
    counts = dict.fromkeys(("pixels", "lesion", "valid", "valid_lesion", "valid_lesion_true", "kept_lesion"), 0)
    for labeled, unlabeled in batches:
        n = labeled.image.shape[0]
        out = model(torch.cat([labeled.image, unlabeled.image]))
        labels = pseudo_labels(out.logits[n:].float(), threshold=threshold)
        truth = unlabeled.mask
        known = truth != IGNORE_INDEX
        lesion = (truth == 1) & known
        valid = labels.valid & known
        predicted = (labels.labels == 1) & valid
        counts["pixels"] += int(known.sum())
        counts["lesion"] += int(lesion.sum())
        counts["valid"] += int(valid.sum())
        counts["valid_lesion"] += int(predicted.sum())
        counts["valid_lesion_true"] += int((predicted & lesion).sum())
        counts["kept_lesion"] += int((valid & lesion).sum())

    def ratio(a: str, b: str) -> float:
        return counts[a] / counts[b] if counts[b] else float("nan")

    return {
        "lesion_share": ratio("lesion", "pixels"),
        "valid_share": ratio("valid", "pixels"),
        "lesion_share_of_valid": ratio("valid_lesion", "valid"),
        "lesion_precision": ratio("valid_lesion_true", "valid_lesion"),
        "lesion_recall": ratio("valid_lesion_true", "lesion"),
        "lesion_kept_by_threshold": ratio("kept_lesion", "lesion"),
    }


@torch.no_grad()
def pseudo_labels_by_kind(model: nn.Module, data: Any, config: TrainConfig) -> dict[str, dict[str, float]]:
    """Stage 1's forward on whole unlabeled images of a hyperechoic phantom, split by lesion kind.

    Each unlabeled image is scored in a training-mode batch with ``config.batch`` labeled images
    and ``config.batch - 1`` other unlabeled ones (all at the evaluation size), so BatchNorm sees
    batch statistics of both halves as in training; logits are upsampled to the full mask.
    """
    size = config.eval_size or config.resize or config.crop
    unlabeled, labeled = (part.with_transform(EvalTransform(size)) for part in (data.unlabeled, data.labeled))
    model = copy.deepcopy(model).train()
    n = config.batch
    kinds = ("bright", "dark", "background")
    counts = {k: dict.fromkeys(("pixels", "predicted", "confident_lesion", "confident_background"), 0) for k in kinds}
    for j in range(len(unlabeled)):
        sample = unlabeled[j]
        images = [labeled[(j + k) % len(labeled)].image for k in range(n)] + [sample.image]
        images += [unlabeled[(j + k) % len(unlabeled)].image for k in range(1, n)]
        logits = model(torch.stack(images)).logits[n : n + 1].float()  # image j, (1, 2, h, w)
        mask = sample.full_mask == 1
        full = F.interpolate(logits, size=mask.shape, mode="bilinear", align_corners=False)
        labels = pseudo_labels(full, threshold=config.threshold)  # the trainer's rule, at full resolution
        lesion, valid = labels.labels[0] == 1, labels.valid[0]
        bright = unlabeled.bright_lesions(j)
        regions = {"bright": bright & mask, "dark": mask & ~bright, "background": ~mask}
        for kind, region in regions.items():
            c = counts[kind]
            c["pixels"] += int(region.sum())
            c["predicted"] += int((region & lesion).sum())
            c["confident_lesion"] += int((region & lesion & valid).sum())
            c["confident_background"] += int((region & ~lesion & valid).sum())
    return {kind: {"pixels": c["pixels"], **{key: c[key] / c["pixels"] if c["pixels"] else float("nan")
                                          for key in ("predicted", "confident_lesion", "confident_background")}}
            for kind, c in counts.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.checkpoint.is_file():
        raise SystemExit(f"{args.checkpoint}: no such file")
    state = read_checkpoint(args.checkpoint)
    model, config = DeepLabV3Plus.from_checkpoint(state).eval(), trained_config(state)
    config = dataclasses.replace(config, **{k: v for k, v in (("data", args.data), ("split", args.split)) if v is not None})
    # Without --split the trainer wrote (and reused) a split file in its --out folder.
    split = Path(config.split) if config.split else Path(config.out) / "splits.json"
    if not split.is_file():
        raise SystemExit(f"the checkpoint's split file {split} is missing; pass the split with --split")
    data = fold_data(open_dataset(config), split, config)
    if args.by_lesion_kind and not (isinstance(data.unlabeled, PhantomDataset) and config.phantom_hyperechoic > 0):
        raise SystemExit("--by-lesion-kind needs a checkpoint trained on the phantom with --phantom-hyperechoic > 0, "
                         f"this one used --data {config.data!r} with hyperechoic {config.phantom_hyperechoic}")
    report: dict[str, Any] = {"checkpoint": str(args.checkpoint), "iteration": state.get("iteration")}

    def score(name: str, m: nn.Module, split: str = "val") -> None:
        result = evaluate(m, data.val if split == "val" else data.test, torch.device("cpu"))
        report[name if split == "val" else f"test, {name}"] = {"dice": result.dice, "iou": result.iou}
        print(f"{split:<4} {name:<28} Dice {result.dice:.4f}  IoU {result.iou:.4f}", flush=True)

    print(f"{args.checkpoint}: iteration {state.get('iteration')}, {len(data.val)} val images", flush=True)
    score("as trained", model)
    epa = getattr(model, "epa", None)
    if epa is not None and bool(epa.container.initialized):
        with epa_off(model):
            score("EPA off", model)
    fpa: Any = getattr(model, "fpa", None)
    if fpa is not None:
        kept = fpa.eval_pairing
        other = "identity" if kept == "self" else "self"
        fpa.eval_pairing = other
        score(f"FPA eval_pairing={other}", model)
        fpa.eval_pairing = kept
    batches = list(training_batches(config, data, args.batches))
    precise = reestimated(model, config, batches)
    score("BN re-estimated", precise)
    if args.test:
        score("as trained", model, "test")
        score("BN re-estimated", precise, "test")
    if epa is not None and bool(epa.container.initialized):
        with epa_off(model):
            score("EPA off, BN re-estimated", reestimated(model, config, batches))
    size = epa_size(model, data)
    if size is not None:
        report["epa_norm_ratio"] = size
        print(f"EPA: |F_e| / |F| = {size:.3f} on the val images", flush=True)
    quality = pseudo_label_quality(model, batches, config.threshold)
    report["pseudo_labels"] = quality
    print(
        f"pseudo-labels (τ = {config.threshold}) on {len(batches) * config.batch} unlabeled crops: "
        f"{quality['valid_share']:.1%} of pixels confident; lesion is {quality['lesion_share']:.1%} of all pixels "
        f"but {quality['lesion_share_of_valid']:.1%} of the confident ones; lesion precision "
        f"{quality['lesion_precision']:.3f}, recall {quality['lesion_recall']:.3f}; the threshold keeps "
        f"{quality['lesion_kept_by_threshold']:.1%} of the true lesion pixels",
        flush=True,
    )
    if args.by_lesion_kind:
        kinds = pseudo_labels_by_kind(model, data, config)
        report["by_lesion_kind"] = kinds
        print(f"whole unlabeled images, {len(data.unlabeled)} (τ = {config.threshold}): predicted lesion / confident "
              "lesion / confident background, share of each kind's pixels", flush=True)
        for kind, figures in kinds.items():
            print(f"  {kind:<10} {figures['pixels']:>9} px: {figures['predicted']:.3f} / "
                  f"{figures['confident_lesion']:.3f} / {figures['confident_background']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
