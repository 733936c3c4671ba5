"""The model-agnostic CSC-PA iteration, the batch streams, the metrics and the checkpoints."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from torch import Tensor, nn

from cscpa_layers import EdgePrototypeAttention, ForegroundPrototypeAttention
from examples.engine.checkpoint import save_atomic
from examples.engine.cscpa_step import CSCPAStep
from examples.engine.config import TrainConfig
from examples.engine.optim import sgd_poly
from examples.engine.step import CSCPAOptions, NonFiniteLossError, labels_at
from examples.engine.metrics import dice_iou, mean_std
from examples.engine.streams import IndexStream, SeededItems, StreamBatches

ROOT = Path(__file__).resolve().parents[1]


class Out(NamedTuple):
    logits: Tensor
    low_res_logits: Tensor
    features: Tensor


class Net(nn.Module):
    """A stand-in segmentation network: features at half resolution carry FPA and EPA."""

    def __init__(self, poison: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fpa = ForegroundPrototypeAttention(8)
        self.epa = EdgePrototypeAttention(8, slots=16)
        self.head = nn.Conv2d(8, 2, 1)
        self.poison = poison

    def forward(self, x: Tensor, *, edge_bank: Tensor | None = None) -> Out:
        f = torch.relu(self.stem(x))
        f = self.fpa(f) + self.epa(f, edge_bank) - f
        low = self.head(f)
        if self.poison:
            low = low * float("nan")
        return Out(nn.functional.interpolate(low, size=x.shape[-2:], mode="bilinear", align_corners=False), low, f)


def _batch(n: int = 2, size: int = 16) -> tuple[Tensor, Tensor, Tensor]:
    x_l, x_u = torch.randn(n, 3, size, size), torch.randn(n, 3, size, size)
    y_l = torch.zeros(n, size, size, dtype=torch.long)
    y_l[:, 4:12, 4:12] = 1
    return x_l, y_l, x_u


def test_train_step_trains_the_container_mixer_and_stores_a_new_bank() -> None:
    net = Net()
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=net.epa.container,
                     options=CSCPAOptions(patch_size=4, edge_samples=16))
    x_l, y_l, x_u = _batch()
    _, edges = step.pretrain_step(x_l, y_l, x_u)
    assert edges.shape[1] == 8 and edges.shape[0] > 0
    net.epa.container.initialize(edges)
    bank_before = net.epa.container.bank.clone()
    mixer_before = net.epa.container.mixer.weight.detach().clone()
    stats = step.train_step(x_l, y_l, x_u, epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    assert stats.edge_candidates > 0
    assert 0.0 < stats.masked < 1.0
    assert not torch.equal(net.epa.container.bank, bank_before)
    # The stage-2 loss reached the mixer through the in-graph bank, and SGD moved it.
    assert not torch.equal(net.epa.container.mixer.weight, mixer_before)


@pytest.mark.parametrize("unsup_weight", [0.0, 1.0, 2.5])
def test_unsup_weight_scales_the_pseudo_label_terms(unsup_weight: float) -> None:
    torch.manual_seed(0)
    net = Net()
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=None,
                     options=CSCPAOptions(patch_size=4, threshold=0.5, unsup_weight=unsup_weight))
    x_l, y_l, x_u = _batch()
    stats = step.train_step(x_l, y_l, x_u, epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    assert stats.ce_unlabeled > 0  # computed and logged whatever the weight
    expected = stats.ce_labeled + stats.pal_labeled + unsup_weight * (stats.ce_unlabeled + stats.pal_unlabeled)
    assert stats.loss == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize(("epoch", "factor"), [(3, 1 / 3), (4, 2 / 3), (5, 1.0), (9, 1.0)])
def test_unsup_rampup_raises_the_pseudo_label_weight_per_stage_2_epoch(epoch: int, factor: float) -> None:
    torch.manual_seed(0)
    net = Net()
    options = CSCPAOptions(patch_size=4, threshold=0.5, unsup_weight=1.5, unsup_rampup=3)
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=None, options=options,
                     pretrain_epochs=3, epochs=10)
    x_l, y_l, x_u = _batch()
    stats = step.train_step(x_l, y_l, x_u, epoch=epoch, epochs=10, generator=torch.Generator().manual_seed(0))
    assert stats.ce_unlabeled > 0
    expected = stats.ce_labeled + stats.pal_labeled + 1.5 * factor * (stats.ce_unlabeled + stats.pal_unlabeled)
    assert stats.loss == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert [options.unsup_weight_at(k) for k in range(4)] == pytest.approx([0.5, 1.0, 1.5, 1.5])
    assert CSCPAOptions(unsup_weight=2.0).unsup_weight_at(0) == 2.0  # 0: off, the paper's
    with pytest.raises(ValueError, match=r"unsup_rampup must be >= 0 \(0: off\), got -1"):
        CSCPAOptions(unsup_rampup=-1)


def test_lesion_threshold_applies_to_pixels_labelled_lesion_only() -> None:
    torch.manual_seed(0)
    net = Net()
    x_l, y_l, x_u = _batch()
    with torch.no_grad():  # stage 1's pseudo-labels come from this forward, before any step
        predicted = net(torch.cat([x_l, x_u])).logits[x_l.shape[0]:].argmax(1)
    lesion_share = predicted.eq(1).float().mean().item()
    assert 0.0 < lesion_share < 1.0

    def reliable(threshold: float, lesion_threshold: float | None = None) -> float:
        model = Net()
        model.load_state_dict(net.state_dict())
        step = CSCPAStep(model, torch.optim.SGD(model.parameters(), lr=0.1), container=None,
                         options=CSCPAOptions(patch_size=4, threshold=threshold, lesion_threshold=lesion_threshold))
        return step.train_step(x_l, y_l, x_u, epoch=0, epochs=4, generator=torch.Generator().manual_seed(0)).pseudo_valid

    # background never reaches tau = 1 (two classes); every lesion pixel reaches 0
    assert reliable(threshold=1.0, lesion_threshold=0.0) == pytest.approx(lesion_share, abs=1e-6)
    assert reliable(threshold=1.0) == 0.0
    assert reliable(threshold=0.6, lesion_threshold=0.6) == reliable(threshold=0.6)


def test_bad_lesion_threshold_fails_when_the_options_are_built() -> None:
    with pytest.raises(ValueError, match=r"lesion_threshold must be in \[0.0, 1.0\], got 1.5"):
        CSCPAOptions(lesion_threshold=1.5)
    with pytest.raises(ValueError, match=r"lesion_threshold needs reliability 'threshold', got 'entropy'"):
        CSCPAOptions(lesion_threshold=0.5, reliability="entropy")
    assert CSCPAOptions(threshold=0.8, lesion_threshold=0.5).pseudo_label_thresholds == (0.8, 0.5)
    assert CSCPAOptions(threshold=0.7).pseudo_label_thresholds == 0.7


def test_supervised_step_is_cross_entropy_only() -> None:
    net = Net()
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=None)
    x_l, y_l, _ = _batch()
    stats = step.supervised_step(x_l, y_l)
    assert stats.loss == stats.ce_labeled > 0 and stats.pal_labeled == 0.0


def test_non_finite_loss_raises_before_any_step() -> None:
    net = Net(poison=True)
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=net.epa.container)
    before = [p.detach().clone() for p in net.parameters()]
    x_l, y_l, x_u = _batch()
    with pytest.raises(NonFiniteLossError, match="pre-training loss is nan"):
        step.pretrain_step(x_l, y_l, x_u)
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


def test_a_real_stage_2_nan_keeps_stage_1s_step_and_restores_the_bank() -> None:
    """A NaN mixer weight poisons only the in-graph bank of stage 2 (stage 1 uses the stored
    bank): stage 1 steps, stage 2 does not, and the stored bank is as it was."""
    torch.manual_seed(0)
    net = Net()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    step = CSCPAStep(net, optimizer, container=net.epa.container, options=CSCPAOptions(patch_size=4, edge_samples=16))
    x_l, y_l, x_u = _batch()
    _, edges = step.pretrain_step(x_l, y_l, x_u)
    net.epa.container.initialize(edges)
    with torch.no_grad():
        net.epa.container.mixer.weight[0, 0] = float("nan")
    bank = net.epa.container.bank.clone()
    head = net.head.weight.detach().clone()
    stage_1_steps = []
    original_step = optimizer.step

    def counting_step(*args: object, **kwargs: object) -> object:
        stage_1_steps.append(1)
        return original_step(*args, **kwargs)  # type: ignore[arg-type]

    optimizer.step = counting_step  # type: ignore[method-assign]
    with pytest.raises(NonFiniteLossError, match=r"stage-2 loss is nan; its step was not taken \(stage 1's step"):
        step.train_step(x_l, y_l, x_u, epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    assert len(stage_1_steps) == 1  # stage 1 stepped, stage 2 did not
    assert not torch.equal(net.head.weight, head)
    assert all(torch.isfinite(p).all() for name, p in net.named_parameters() if "mixer" not in name)
    assert torch.equal(net.epa.container.bank, bank)  # the update was undone


def test_labels_at_keeps_ignored_pixels_and_classes() -> None:
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 1, 1], [255, 255, 1, 1]]])
    assert labels_at(labels, (2, 2)).tolist() == [[[0, 1], [255, 1]]]


def test_the_trainers_schedule_is_poly_with_power_0_9() -> None:
    net = nn.Linear(2, 2)
    optimizer, scheduler = sgd_poly(net, TrainConfig(lr=0.01), 100)
    seen = {}
    for t in range(101):
        seen[t] = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
    assert seen[0] == pytest.approx(0.01)
    assert seen[50] == pytest.approx(0.01 * 0.5**0.9)
    assert seen[100] == 0.0


def test_streams_are_deterministic_and_split_between_ranks() -> None:
    stream = IndexStream(10, seed=3, tag="u")
    again = IndexStream(10, seed=3, tag="u")
    assert [stream.batch(t, 4) for t in range(6)] == [again.batch(t, 4) for t in range(6)]
    # One pass covers every index exactly once before repeating.
    first_pass = [i for t in range(5) for i, _ in stream.batch(t, 2)]
    assert sorted(first_pass) == list(range(10))
    # Two ranks draw disjoint halves of the same global batch.
    rank0 = stream.batch(2, 2, rank=0, world=2)
    rank1 = stream.batch(2, 2, rank=1, world=2)
    assert rank0 + rank1 == stream.batch(2, 4)  # the global batch of 4, split in two
    assert {i for i, _ in rank0}.isdisjoint({i for i, _ in rank1})
    # Resuming at step 3 sees what an uninterrupted sampler sees from step 3 on.
    assert list(StreamBatches(stream, 3, 6, 4)) == list(StreamBatches(stream, 0, 6, 4))[3:]
    with pytest.raises(ValueError, match="empty set"):
        IndexStream(0, seed=0, tag="labeled")


def test_seeded_items_make_augmentation_a_function_of_the_seed() -> None:
    class Noisy(torch.utils.data.Dataset[Tensor]):
        def __len__(self) -> int:
            return 3

        def __getitem__(self, index: int) -> Tensor:
            return torch.rand(2) + index

    items = SeededItems(Noisy())
    assert torch.equal(items[(1, 42)], items[(1, 42)])
    assert not torch.equal(items[(1, 42)], items[(1, 43)])


def test_dice_iou_per_image() -> None:
    pred = torch.tensor([[1, 1], [0, 0]])
    true = torch.tensor([[1, 0], [0, 0]])
    assert dice_iou(pred, true) == pytest.approx((2 / 3, 1 / 2))
    assert dice_iou(torch.zeros(2, 2), torch.zeros(2, 2)) == (1.0, 1.0)  # empty on empty scores 1
    assert dice_iou(torch.ones(2, 2), torch.zeros(2, 2)) == (0.0, 0.0)
    ignored = torch.tensor([[1, 255], [0, 0]])
    assert dice_iou(torch.tensor([[1, 1], [0, 0]]), ignored) == (1.0, 1.0)
    with pytest.raises(ValueError, match="same shape"):
        dice_iou(torch.zeros(2, 2), torch.zeros(3, 2))
    assert mean_std([0.5, 1.0]) == pytest.approx((0.75, 0.25))


def test_atomic_save_leaves_no_partial_file(tmp_path: Path) -> None:
    target = tmp_path / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, target)

    class Boom:
        def __reduce__(self) -> tuple[object, ...]:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"a": Boom()}, target)
    assert torch.equal(torch.load(target)["a"], torch.ones(2))  # the old file survived
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # and no temporary is left


def test_custom_network_example_runs() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "examples.tutorials.custom_network", "--iters", "3", "--pretrain-iters", "2", "--size", "64"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pre-train   2" in result.stdout and "cscpa   3" in result.stdout
    assert "val Dice" in result.stdout


def test_float16_autocast_with_a_grad_scaler_trains() -> None:
    """The fp16 path (autocast + GradScaler) through pre-training, CSC-PA and SupOnly steps.
    On CPU float16 kernels are slow, so a tiny network stands in; --amp fp16 is meant for CUDA."""
    torch.manual_seed(0)
    net = Net()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    step = CSCPAStep(net, torch.optim.SGD(net.parameters(), lr=0.1), container=net.epa.container,
                     options=CSCPAOptions(patch_size=4, edge_samples=16), scaler=scaler,
                     autocast=lambda: torch.autocast("cpu", dtype=torch.float16))
    x_l, y_l, x_u = _batch()
    before = net.head.weight.detach().clone()
    _, edges = step.pretrain_step(x_l, y_l, x_u)
    net.epa.container.initialize(edges)
    stats = step.train_step(x_l, y_l, x_u, epoch=0, epochs=4, generator=torch.Generator().manual_seed(0))
    sup = step.supervised_step(x_l, y_l)
    assert all(math.isfinite(v) for v in (*stats[:7], sup.loss))
    assert scaler.get_scale() > 0 and not torch.equal(net.head.weight, before)
    assert net.head.weight.dtype == torch.float32  # master weights stay float32
