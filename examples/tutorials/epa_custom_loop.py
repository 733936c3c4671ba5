"""Train a tiny conv net with EdgePrototypeAttention in a hand-written loop.

A toy segmentation task: find a bright disc in noise. Batches hold 4 "labeled" and 4
"unlabeled" images. The loop shows the three pieces of EPA a custom network needs:

1. candidate selection: ``select_edge_features`` picks features at edge pixels of the
   prediction, correct ones on labeled images and confident ones on unlabeled images;
2. the container: ``initialize`` at the end of pre-training, then ``update`` every step;
3. the EPA forward with the bank that ``update`` returned, so the container's mixer learns.

Run:

    python -m examples.tutorials.epa_custom_loop [--pretrain 20] [--steps 40] [--seed 0]
"""

from __future__ import annotations


import argparse
import io

import torch
from torch import Tensor, nn

from cscpa_layers import EdgePrototypeAttention, select_edge_features
from examples.tutorials.toy_discs import iou, make_batch


class TinyNet(nn.Module):
    """Two convs -> EPA -> a 1x1 classifier; ``features`` and ``classify`` are split so the loop
    can select edge candidates from the features before the EPA forward."""

    def __init__(self, channels: int = 32, slots: int = 64) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
        )
        self.epa = EdgePrototypeAttention(channels, slots=slots)
        self.head = nn.Conv2d(channels, 2, 1)

    def features(self, images: Tensor) -> Tensor:
        return self.body(images)  # (B, C, H, W)

    def classify(self, feats: Tensor, bank: Tensor | None = None) -> Tensor:
        return self.head(self.epa(feats, bank))  # (B, 2, H, W)

    def forward(self, images: Tensor) -> Tensor:
        return self.classify(self.features(images))  # inference: the stored bank


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrain", type=int, default=20, help="supervised steps before the container (default 20)")
    parser.add_argument("--steps", type=int, default=40, help="steps with EPA after that (default 40)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    data = torch.Generator().manual_seed(args.seed)
    draw = torch.Generator().manual_seed(args.seed + 1)  # the random draws of candidates and slots
    net = TinyNet()
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = nn.CrossEntropyLoss()
    test_images, test_masks = make_batch(16, 32, torch.Generator().manual_seed(10_000 + args.seed))
    container = net.epa.container
    start_mixer = container.mixer.weight.detach().clone()
    print(f"before training: held-out IoU {iou(net, test_images, test_masks):.3f}")

    # Pre-training: supervised only. EPA is the identity until its container is initialised.
    for step in range(1, args.pretrain + 1):
        images, masks = make_batch(4, 32, data)
        loss = loss_fn(net(images), masks)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step == 1 or step % 10 == 0:
            print(f"pretrain {step:4d}  loss {loss.item():.4f}")

    # End of pre-training: fill the bank with correctly predicted labeled edge features.
    images, masks = make_batch(8, 32, data)
    with torch.no_grad():
        feats = net.features(images)
        pred = net.classify(feats).argmax(1)
        candidates = select_edge_features(feats, pred, target=masks, num=256, generator=draw)
    if candidates.shape[0] > 0:
        container.initialize(candidates, generator=draw)
        print(f"initialised the container from {candidates.shape[0]} candidates")
    else:
        print("no correct edge pixel yet; the first update() with candidates will initialise")

    for step in range(1, args.steps + 1):
        labeled, masks = make_batch(4, 32, data)
        unlabeled, _ = make_batch(4, 32, data)  # its masks are never used
        feats = net.features(torch.cat([labeled, unlabeled]))  # (8, C, H, W)
        with torch.no_grad():  # the current prediction, with the stored bank
            confidence, pred = net.classify(feats).softmax(1).max(1)  # (8, H, W) each
        # 1. candidates: correct edge pixels of the labeled half, confident ones of the other
        candidates = torch.cat(
            [
                select_edge_features(feats[:4], pred[:4], target=masks, num=128, generator=draw),
                select_edge_features(feats[4:], pred[4:], confidence=confidence[4:], threshold=0.8, num=128, generator=draw),
            ]
        )
        # 2. the container update: a new bank, still in the graph through container.mixer
        bank = container.update(candidates, generator=draw)
        # 3. the EPA forward with that bank, so this step's loss trains the mixer too
        logits = net.classify(feats, bank)
        loss = loss_fn(logits[:4], masks)  # only the labeled half has targets here
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if step == 1 or step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}  candidates {candidates.shape[0]}", flush=True)

    drift = (container.mixer.weight.detach() - start_mixer).norm().item()
    print(f"after {args.steps} steps: held-out IoU {iou(net, test_images, test_masks):.3f}")
    print(f"mixer moved {drift:.4f} from its blend initialisation")

    # The bank and its flag are buffers: a checkpoint carries them.
    buffer = io.BytesIO()
    torch.save(net.state_dict(), buffer)
    buffer.seek(0)
    restored = TinyNet()
    restored.load_state_dict(torch.load(buffer, weights_only=True))
    same = torch.equal(restored.epa.container.bank, container.bank) and bool(restored.epa.container.initialized)
    print(f"state_dict round trip keeps the bank: {same}")


if __name__ == "__main__":
    main()
