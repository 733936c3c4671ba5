"""The weight average behind ``--ema``: its update rule, its buffers, its state, its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from examples.engine.ema import EpochAverage, WeightAverage


def _net() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))


def _perturb(model: nn.Module, scale: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))


def test_the_average_follows_the_documented_rule() -> None:
    model = _net()
    average = WeightAverage(model, 0.9)
    expected = [p.detach().clone() for p in model.parameters()]
    for t in range(30):
        _perturb(model, 0.1)
        average.update()
        d = min(0.9, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach() for e, p in zip(expected, model.parameters())]
    got = list(average.average.parameters())
    for e, a, p in zip(expected, got, model.parameters()):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
        assert not torch.allclose(a, p, atol=1e-3)  # an average, not a copy of the last step
    assert average.updates == 30


def test_buffers_are_copied_not_averaged() -> None:
    model = _net()
    average = WeightAverage(model, 0.99)
    model.train()
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8))
        average.update()
    bn, copied = model[1], average.average[1]
    assert torch.equal(copied.running_mean, bn.running_mean) and torch.equal(copied.running_var, bn.running_var)
    assert int(copied.num_batches_tracked) == int(bn.num_batches_tracked) == 3
    with torch.no_grad():
        bn.running_mean.fill_(7.0)
    average.copy_buffers()
    assert torch.equal(copied.running_mean, torch.full((4,), 7.0))


def test_the_average_takes_no_gradients_and_leaves_the_model_alone() -> None:
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    average = WeightAverage(model, 0.5)
    _perturb(model, 1.0)
    after = [p.detach().clone() for p in model.parameters()]
    average.update()
    assert all(not p.requires_grad for p in average.average.parameters())
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), after))
    assert not all(torch.equal(b, a) for b, a in zip(before, after))


def test_state_round_trip_continues_exactly() -> None:
    torch.manual_seed(0)
    model = _net()
    a = WeightAverage(model, 0.8)
    for _ in range(4):
        _perturb(model, 0.1)
        a.update()
    b = WeightAverage(model, 0.8)
    b.load_state_dict(a.state_dict())
    for _ in range(3):
        _perturb(model, 0.1)
        a.update()
        b.update()
    for x, y in zip(a.average.state_dict().values(), b.average.state_dict().values()):
        assert torch.equal(x, y)
    with pytest.raises(ValueError, match="decay 0.8, this run 0.9"):
        WeightAverage(model, 0.9).load_state_dict(a.state_dict())


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1, "0.9"])
def test_a_decay_outside_the_open_interval_is_refused(decay: object) -> None:
    with pytest.raises(ValueError, match="decay must be a float in \\(0, 1\\)"):
        WeightAverage(_net(), decay)  # type: ignore[arg-type]


def test_epoch_average_is_the_plain_mean_of_what_was_added() -> None:
    model = _net()
    average = EpochAverage()
    seen = []
    for _ in range(3):
        _perturb(model, 0.5)
        average.add(model)
        seen.append([p.detach().clone() for p in model.parameters()])
    with torch.no_grad():
        model[1].running_mean.fill_(7.0)  # the buffers come from the network passed to average()
    averaged = average.average(model)
    for a, *ps in zip(averaged.parameters(), *seen):
        torch.testing.assert_close(a, sum(ps) / 3, rtol=1e-6, atol=1e-7)
        assert not torch.allclose(a, ps[-1], atol=1e-2)  # not the last epoch's weights
        assert not a.requires_grad
    assert torch.equal(averaged[1].running_mean, model[1].running_mean) and not averaged.training
    assert average.count == 3 and all(s.dtype == torch.float64 for s in average.sums)
    # the network itself is left alone
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), seen[-1]))


def test_epoch_average_round_trips_through_its_state() -> None:
    model = _net()
    whole, cut = EpochAverage(), EpochAverage()
    for step in range(4):
        _perturb(model, 0.3)
        whole.add(model)
        cut.add(model)
        if step == 1:
            resumed = EpochAverage()
            resumed.load_state_dict(cut.state_dict())
            cut = resumed
    for a, b in zip(whole.average(model).parameters(), cut.average(model).parameters()):
        assert torch.equal(a, b)


def test_epoch_average_refuses_nothing_and_other_networks() -> None:
    with pytest.raises(ValueError, match="nothing was added"):
        EpochAverage().average(_net())
    average = EpochAverage()
    average.add(_net())
    with pytest.raises(ValueError, match="parameters differ"):
        average.add(nn.Conv2d(3, 4, 3))
