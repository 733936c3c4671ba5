"""Put ForegroundPrototypeAttention into a plain nn.Sequential conv net and train it.

A toy segmentation task: find a bright disc in noise. Each training batch holds 4 "labeled" and
4 "unlabeled" images; FPA pairs the halves index-wise, and the loss only uses the labeled half,
as in semi-supervised training. Run:

    python -m examples.tutorials.fpa_sequential [--steps 60] [--seed 0]

It prints the loss and the foreground IoU on held-out images before and after training.
"""

from __future__ import annotations


import argparse
import time

import torch
from torch import nn

from cscpa_layers import ForegroundPrototypeAttention
from examples.tutorials.toy_discs import iou, make_batch


def build_net(channels: int = 32) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, channels, 3, padding=1),
        nn.BatchNorm2d(channels),
        nn.ReLU(),
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.ReLU(),
        ForegroundPrototypeAttention(channels),  # pairs batch halves in training
        nn.Conv2d(channels, 2, 1),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    net = build_net()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    test_images, test_masks = make_batch(16, 32, torch.Generator().manual_seed(10_000 + args.seed))
    print(net)
    print(f"before training: held-out IoU {iou(net, test_images, test_masks):.3f}")
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        images, masks = make_batch(8, 32, generator)
        logits = net(images)  # FPA pairs image i of the first half with image i of the second
        loss = loss_fn(logits[:4], masks[:4])  # only the "labeled" half has targets
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step % 10 == 0 or step == 1:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)
    print(f"after {args.steps} steps ({time.perf_counter() - start:.1f}s): held-out IoU {iou(net, test_images, test_masks):.3f}")


if __name__ == "__main__":
    main()
