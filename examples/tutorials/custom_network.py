"""All four CSC-PA parts in a small network that is not DeepLabv3+: a tiny U-Net.

This is the drop-in recipe for your own network:

1. put `ForegroundPrototypeAttention` and `EdgePrototypeAttention` on a decoder feature map F
   and fuse them as F' = F + F_f + F_e (both computed from F);
2. return the logits at the input size, the logits at the feature size and F';
3. hand the network, its optimiser and EPA's container to `examples.engine.cscpa_step.CSCPAStep`,
   whose `run` does pre-training, then stage 1, confidence masking, the container update and
   stage 2 with the pixel affinity loss, per iteration, and whose `end_epoch` initialises the
   container at the end of pre-training.

To train it in the full trainer instead (streams, checkpoints, --resume, evaluation), see
docs/custom-network.md and `examples.models.protocol`.

Run it on the synthetic phantom (no files needed):

    python -m examples.tutorials.custom_network [--iters 30] [--pretrain-iters 10] [--size 96]
"""

from __future__ import annotations

import argparse
import time
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cscpa_layers import EdgePrototypeAttention, ForegroundPrototypeAttention
from examples.engine.cscpa_step import CSCPAStep
from examples.engine.step import CSCPAOptions
from examples.data.base import SegmentationDataset
from examples.engine.evaluate import evaluate
from examples.data.phantom_dataset import PhantomDataset
from examples.data.samples import collate_samples
from examples.data.transforms import EvalTransform, TrainTransform


class Outputs(NamedTuple):
    logits: Tensor  # (B, K, H, W) at the input size
    low_res_logits: Tensor  # (B, K, H/2, W/2)
    features: Tensor  # (B, C, H/2, W/2), F' after FPA and EPA


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class TinyUNet(nn.Module):
    """Three-level U-Net whose half-resolution decoder feature carries FPA and EPA."""

    def __init__(self, num_classes: int = 2, width: int = 16) -> None:
        super().__init__()
        self.enc1, self.enc2, self.enc3 = _block(3, width), _block(width, 2 * width), _block(2 * width, 4 * width)
        self.dec2 = _block(4 * width + 2 * width, 2 * width)
        channels = 2 * width
        self.fpa = ForegroundPrototypeAttention(channels, eval_pairing="self")
        self.epa = EdgePrototypeAttention(channels, slots=64)
        self.head_low = nn.Conv2d(channels, num_classes, 1)
        self.dec1 = _block(channels + width, width)
        self.head = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: Tensor, *, edge_bank: Tensor | None = None) -> Outputs:
        e1 = self.enc1(x)  # (B, w, H, W)
        e2 = self.enc2(F.max_pool2d(e1, 2))  # (B, 2w, H/2, W/2)
        e3 = self.enc3(F.max_pool2d(e2, 2))  # (B, 4w, H/4, W/4)
        up3 = F.interpolate(e3, size=e2.shape[-2:], mode="bilinear", align_corners=False)
        feats = self.dec2(torch.cat([up3, e2], 1))  # F, (B, 2w, H/2, W/2)
        # F' = F + F_f + F_e, each term from F (residual=False returns the term alone)
        fused = feats + self.fpa(feats, residual=False) + self.epa(feats, edge_bank, residual=False)
        up2 = F.interpolate(fused, size=e1.shape[-2:], mode="bilinear", align_corners=False)
        logits = self.head(self.dec1(torch.cat([up2, e1], 1)))
        return Outputs(logits, self.head_low(fused), fused)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iters", type=int, default=30, help="CSC-PA iterations after pre-training (default 30)")
    parser.add_argument("--pretrain-iters", type=int, default=10, help="pre-training iterations (default 10)")
    parser.add_argument("--size", type=int, default=96, help="phantom image side and crop (default 96)")
    parser.add_argument("--batch", type=int, default=4, help="labeled and unlabeled images per step (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    train = PhantomDataset(64, size=args.size, seed=args.seed, transform=TrainTransform(args.size))
    val = PhantomDataset(16, size=args.size, seed=args.seed + 1, transform=EvalTransform(args.size))
    labeled, unlabeled = train.subset(train.ids[:8]), train.subset(train.ids[8:])

    model = TinyUNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # Pre-training is epoch 0 (all its iterations' edges fill the container at its end), then one
    # epoch per CSC-PA iteration, so that t / T runs over the CSC-PA iterations.
    step = CSCPAStep(model, optimizer, container=model.epa.container, pretrain_epochs=1, epochs=1 + args.iters,
                     seed=args.seed, options=CSCPAOptions(patch_size=args.size // 8, edge_samples=64))
    generator = torch.Generator().manual_seed(args.seed)

    def batch(dataset: SegmentationDataset) -> tuple[Tensor, Tensor]:
        picks = torch.randint(len(dataset), (args.batch,), generator=generator).tolist()
        items = collate_samples([dataset[i] for i in picks])
        return items.image, items.mask

    start = time.perf_counter()
    for it in range(args.pretrain_iters):
        (x_l, y_l), (x_u, _) = batch(labeled), batch(unlabeled)  # the unlabeled masks are never used
        stats = step.run(x_l, y_l, x_u, epoch=0, generator=generator)
        print(f"pre-train {it + 1:3d}  loss {stats.loss:.4f}  edge candidates {stats.edge_candidates}", flush=True)
    step.end_epoch(0)  # the container's bank from the buffered edges
    for it in range(args.iters):
        (x_l, y_l), (x_u, _) = batch(labeled), batch(unlabeled)
        stats = step.run(x_l, y_l, x_u, epoch=1 + it, generator=generator)
        print(
            f"cscpa {it + 1:3d}  loss {stats.loss:.4f}  CE_u {stats.ce_unlabeled:.4f}  PAL_u {stats.pal_unlabeled:.4f}  "
            f"masked {stats.masked:.2f}  mixer |w| {model.epa.container.mixer.weight.norm():.4f}",
            flush=True,
        )
    result = evaluate(model, val, torch.device("cpu"))
    print(f"done in {time.perf_counter() - start:.1f}s: val Dice {result.dice:.4f}, IoU {result.iou:.4f}")


if __name__ == "__main__":
    main()
