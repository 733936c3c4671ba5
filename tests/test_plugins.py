"""A user's own dataset (through the registry) and own network (through the model protocol)
train in the full trainer, --resume included, with no edit to our files (docs/data.md,
docs/custom-network.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision import tv_tensors

from cscpa_layers import EdgePrototypeAttention, ForegroundPrototypeAttention
from examples.data import registry
from examples.data.base import SegmentationDataset, Transform
from examples.data.registry import DataOptions, build_dataset, register_dataset
from examples.data.samples import RawSample
from examples.data.transforms import NormalizeTransform
from examples.engine.config import TrainConfig
from examples.engine.run import main as train
from examples.models.deeplab import DeepLabV3Plus
from examples.models.trained import load_trained


class Discs(SegmentationDataset):
    """A bright disc on noise per image, through the public hooks: ``items``, ``ids``, ``labels``
    and ``load_item``."""

    def __init__(self, count: int, size: int = 48, transform: Transform | None = None) -> None:
        super().__init__(transform or NormalizeTransform())
        self.size = size
        self.items = list(range(count))
        self.ids = [f"discs/{i:03d}" for i in self.items]
        self.labels = ["all"] * count

    def load_item(self, item: Any, item_id: str) -> RawSample:
        rng = np.random.default_rng(item)
        yy, xx = np.mgrid[: self.size, : self.size]
        cy, cx = rng.uniform(12, self.size - 12, 2)
        mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= rng.uniform(5, 10) ** 2).astype(np.uint8)
        grey = np.clip(60 + 120 * mask + rng.normal(0, 20, mask.shape), 0, 255).astype(np.uint8)
        image = np.ascontiguousarray(np.broadcast_to(grey, (3, self.size, self.size)))
        return RawSample(tv_tensors.Image(torch.from_numpy(image)), tv_tensors.Mask(torch.from_numpy(mask)), item_id)


class Outputs(NamedTuple):
    logits: Tensor
    low_res_logits: Tensor
    features: Tensor


class TwoLevelNet(nn.Module):
    """The protocol of examples.models.protocol: forward(x, *, edge_bank) -> logits, low-res
    logits, features; ``epa`` with its container; no ``backbone``."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.fpa = ForegroundPrototypeAttention(width, eval_pairing="self")
        self.epa = EdgePrototypeAttention(width, slots=16)
        self.head = nn.Conv2d(width, 2, 1)

    def forward(self, x: Tensor, *, edge_bank: Tensor | None = None) -> Outputs:
        f = self.stem(x)  # (B, C, H/2, W/2)
        fused = self.fpa(f) + self.epa(f, edge_bank) - f  # F + F_f + F_e
        low = self.head(fused)
        return Outputs(F.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False), low, fused)

    @classmethod
    def from_config(cls, config: TrainConfig) -> "TwoLevelNet":
        return cls()


@pytest.fixture
def discs(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(registry, "DATASETS", dict(registry.DATASETS))  # leave the registry as found
    register_dataset("test-discs", lambda options: Discs(30, transform=options.transform))
    return "test-discs"


ARGS = ["--method", "cscpa", "--crop", "32", "--resize", "48", "--epochs", "3", "--pretrain-epochs", "1",
        "--iters-per-epoch", "2", "--batch", "2", "--workers", "0", "--overlays", "0", "--fpa-eval", "self"]


def test_the_registry_builds_a_registered_name_and_refuses_a_second_one(discs: str) -> None:
    dataset = build_dataset(discs)
    assert isinstance(dataset, Discs) and len(dataset) == 30
    assert tuple(dataset[0].image.shape) == (3, 48, 48)
    with pytest.raises(ValueError, match="already registered; pass replace=True"):
        register_dataset(discs, lambda options: Discs(3))
    register_dataset(discs, lambda options: Discs(3), replace=True)
    assert len(build_dataset(discs)) == 3
    with pytest.raises(TypeError, match="builder must be callable"):
        register_dataset("other", "not a function")  # type: ignore[arg-type]


def test_a_builder_that_returns_no_dataset_is_named(discs: str) -> None:
    register_dataset("broken", lambda options: [1, 2, 3])  # type: ignore[arg-type, return-value]
    with pytest.raises(TypeError, match="registered as 'broken' returned a list"):
        build_dataset("broken")


@pytest.mark.slow
def test_own_data_and_own_network_train_and_resume_in_the_full_trainer(discs: str, tmp_path: Path) -> None:
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train([*ARGS, "--data", discs, "--out", str(whole)], build_model=TwoLevelNet.from_config) == 0
    with pytest.raises(SystemExit, match="stopped by --stop-after at iteration 3"):
        train([*ARGS, "--data", discs, "--out", str(resumed), "--stop-after", "3"], build_model=TwoLevelNet.from_config)
    assert train([*ARGS, "--data", discs, "--out", str(resumed), "--resume"], build_model=TwoLevelNet.from_config) == 0
    a = json.loads((whole / "cscpa" / "fold0" / "results.json").read_text())
    b = json.loads((resumed / "cscpa" / "fold0" / "results.json").read_text())
    assert a["test"]["images"] > 0 and a["history"] and a["config"]["data"] == discs
    assert (a["test"], a["history"]) == (b["test"], b["history"])  # resuming is exact
    state = torch.load(whole / "cscpa" / "fold0" / "last.pt", weights_only=False)
    model = TwoLevelNet()
    model.load_state_dict(state["model"])
    assert bool(model.epa.container.initialized)  # the step class initialised the user's container


def test_the_data_options_defaults_are_the_build_dataset_defaults() -> None:
    from examples.engine.config import TrainConfig

    # one phantom size for the trainer, make_splits and build_dataset, so their splits fit each other
    assert DataOptions().phantom_count == TrainConfig().phantom_images == 240
    assert len(build_dataset("phantom", phantom_size=32)) == 240


@pytest.mark.slow
def test_from_checkpoint_rebuilds_the_network_of_a_trainer_checkpoint(tmp_path: Path) -> None:
    config = TrainConfig(backbone="resnet18", output_stride=16, pretrained=False, head_channels=8, fpa_eval="identity")
    torch.manual_seed(0)
    model = DeepLabV3Plus.from_config(config)
    assert model.fpa is not None and model.fpa.eval_pairing == "identity"  # no patching after construction
    import dataclasses

    path = tmp_path / "best.pt"
    torch.save({"config": dataclasses.asdict(config), "model": model.state_dict()}, path)
    again, saved = load_trained(path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, model.eval()(x).logits)
    assert saved.fpa_eval == "identity" and not saved.pretrained


def test_the_trainers_no_phantom_lesion_free_reaches_the_split_and_the_dataset(tmp_path: Path) -> None:
    from examples.data.folds import fold_data, open_dataset, split_file
    from examples.engine.config import TrainConfig

    config = TrainConfig(phantom_images=60, phantom_lesion_free=False, out=str(tmp_path), crop=32)
    dataset = open_dataset(config)
    assert "lesions=0" not in dataset.labels and len(dataset) < 60
    path = split_file(config, main=True)  # made by make_splits, as the trainer does
    assert json.loads(path.read_text())["data"]["lesion_free"] is False
    parts = fold_data(dataset, path, config)
    seen = [i for part in parts for i in part.ids]
    assert sorted(seen) == sorted(dataset.ids)  # every kept image in one part, no lesion-free one anywhere


def test_the_trainers_phantom_hyperechoic_reaches_the_dataset_and_is_checked(tmp_path: Path) -> None:
    from examples.data.folds import open_dataset
    from examples.engine.arguments import parse_args
    from examples.engine.config import TrainConfig

    dataset = open_dataset(TrainConfig(phantom_images=20, phantom_hyperechoic=0.25, out=str(tmp_path)))
    assert getattr(dataset, "hyperechoic") == 0.25
    assert parse_args(["--phantom-hyperechoic", "0.5"]).phantom_hyperechoic == 0.5
    with pytest.raises(SystemExit):
        parse_args(["--phantom-hyperechoic", "1.5"])


def test_the_trainers_fewer_labels_fractions_reach_its_own_split_file(tmp_path: Path) -> None:
    from examples.data.folds import fold_data, open_dataset, split_file
    from examples.engine.config import TrainConfig

    files = {}
    for labeled in ("1/8", "1/32"):
        config = TrainConfig(phantom_images=60, labeled=labeled, out=str(tmp_path / labeled.replace("/", "of")), crop=32)
        files[labeled] = json.loads(split_file(config, main=True).read_text())  # made by make_splits, as the trainer does
        parts = fold_data(open_dataset(config), split_file(config, main=False), config)
        assert len(parts.labeled) == len(files[labeled]["folds"][0]["labeled"][labeled]) > 0
    assert files["1/8"]["labeled_fractions"] == ["1/8", "1/4", "1/2"]  # a default run's file: only the paper's
    assert files["1/32"]["labeled_fractions"] == ["1/32", "1/8", "1/4", "1/2"]
    default, extended = files["1/8"]["folds"], files["1/32"]["folds"]
    for k in range(5):  # the extra fraction moves none of the others (no duplicate groups in the phantom)
        for key in ("train", "val", "test"):
            assert default[k][key] == extended[k][key]
        for fraction in ("1/8", "1/4", "1/2"):
            assert default[k]["labeled"][fraction] == extended[k]["labeled"][fraction]
        assert set(extended[k]["labeled"]["1/32"]) < set(extended[k]["labeled"]["1/8"])  # nested
