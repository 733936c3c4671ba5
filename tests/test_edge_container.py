"""AdaptiveEdgeContainer: Eq. 7-8, learning, persistence, candidate counts and torch.distributed."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st

from cscpa_layers import AdaptiveEdgeContainer
from cscpa_layers._reference.edge_attention import container_update_dense
from cscpa_layers.edge_container import _draw
from tests.conftest import DEVICES


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ready(channels: int = 4, slots: int = 6, dtype: torch.dtype = torch.float32) -> AdaptiveEdgeContainer:
    container = AdaptiveEdgeContainer(channels, slots=slots).to(dtype)
    container.initialize(torch.randn(2 * slots, channels, dtype=dtype), _seeded(0))
    return container


# --- construction and Eq. 7 -------------------------------------------------------------------


def test_state_starts_empty_with_a_blend_mixer() -> None:
    container = AdaptiveEdgeContainer(5, slots=3)
    assert container.bank.shape == (3, 5) and not container.bank.any()
    assert container.initialized.dtype == torch.bool and container.initialized.ndim == 0
    assert not bool(container.initialized)
    eye = torch.eye(3)
    assert torch.equal(container.mixer.weight, torch.cat([eye, eye], 1) / 2)
    assert not container.mixer.bias.any()
    assert set(container.state_dict()) == {"bank", "initialized", "mixer.weight", "mixer.bias"}


def test_first_update_is_the_average_of_the_draw_and_the_bank() -> None:
    container = _ready(4, 6)
    old = container.bank.clone()
    same = torch.randn(1, 4).expand(9, 4)  # every candidate is the same vector v
    new = container.update(same, _seeded(1))
    torch.testing.assert_close(new, 0.5 * (same[:6] + old))
    torch.testing.assert_close(container.bank, new.detach())


def test_update_with_exactly_slots_candidates_moves_the_prototype_halfway() -> None:
    # m == slots: the draw is a permutation, so mean(E_h) is the mean of the candidates.
    container = _ready(4, 6, torch.float64)
    old_proto = container.prototype()
    candidates = torch.randn(6, 4, dtype=torch.float64)
    container.update(candidates, _seeded(3))
    torch.testing.assert_close(container.prototype(), 0.5 * (candidates.mean(0) + old_proto))


def test_update_equals_the_dense_eq7_in_value_and_gradient() -> None:
    container = _ready(5, 4, torch.float64)
    with torch.no_grad():  # a trained-looking mixer, not the blend
        container.mixer.weight.normal_()
        container.mixer.bias.normal_()
    old = container.bank.clone()
    candidates = torch.randn(7, 5, dtype=torch.float64)
    drawn = candidates[_draw(7, 4, _seeded(5), torch.device("cpu"))]
    new = container.update(candidates, _seeded(5))
    params = [container.mixer.weight, container.mixer.bias]
    upstream = torch.randn(4, 5, dtype=torch.float64)
    grads = torch.autograd.grad(new, params, upstream)
    ref = container_update_dense(drawn, old, *params)
    ref_grads = torch.autograd.grad(ref, params, upstream)
    torch.testing.assert_close(new, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want)


def test_gradcheck_through_the_mixer() -> None:
    container = _ready(3, 4, torch.float64)
    start = container.bank.clone()
    candidates = torch.randn(5, 3, dtype=torch.float64)

    def fn(weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        # weight and bias ARE the mixer's parameters (gradcheck perturbs them in place); reset
        # the bank and the draw so every evaluation sees the same C_{h-1} and E_h.
        with torch.no_grad():
            container.bank.copy_(start)
        return container.update(candidates, _seeded(7))

    assert torch.autograd.gradcheck(fn, (container.mixer.weight, container.mixer.bias))


# --- learning and the graph -------------------------------------------------------------------


def test_update_trains_the_mixer_but_not_the_features() -> None:
    container = _ready(4, 6)
    candidates = torch.randn(10, 4, requires_grad=True)
    new = container.update(candidates)
    assert new.requires_grad and not container.bank.requires_grad
    container.prototype(new).square().sum().backward()
    assert container.mixer.weight.grad is not None and container.mixer.weight.grad.abs().sum() > 0
    assert container.mixer.bias.grad is not None and container.mixer.bias.grad.abs().sum() > 0
    assert candidates.grad is None  # detached inside update


def test_the_graph_does_not_grow_across_steps() -> None:
    container = _ready(4, 6)
    container.update(torch.randn(8, 4)).sum().backward()  # frees step 1's graph
    second = container.update(torch.randn(8, 4))
    second.sum().backward()  # would raise if step 2 reached into step 1's freed graph
    assert container.mixer.weight.grad is not None


def test_zero_candidates_keep_the_bank_and_the_mixer_in_the_graph() -> None:
    container = _ready(4, 6)
    old = container.bank.clone()
    out = container.update(torch.empty(0, 4))
    assert torch.equal(out, old) and torch.equal(container.bank, old)
    out.sum().backward()  # connected, with zero gradient (DDP sees every parameter used)
    assert container.mixer.weight.grad is not None and not container.mixer.weight.grad.any()


def test_update_before_initialize_initializes() -> None:
    container = AdaptiveEdgeContainer(4, slots=3)
    out = container.update(torch.empty(0, 4))  # nothing to initialise from: still empty
    assert not bool(container.initialized) and not out.any()
    candidates = torch.randn(3, 4)
    out = container.update(candidates, _seeded(0))
    assert bool(container.initialized)
    assert torch.equal(out, container.bank)
    # the bank holds the candidates themselves (a permutation of them), not a blend with zeros
    assert sorted(container.bank[:, 0].tolist()) == sorted(candidates[:, 0].tolist())


def test_initialize_with_zero_candidates_raises() -> None:
    with pytest.raises(ValueError, match=r"cannot initialize the edge container from 0 candidates"):
        AdaptiveEdgeContainer(4, slots=3).initialize(torch.empty(0, 4))


# --- candidate counts -------------------------------------------------------------------------


def test_initialize_draws_without_replacement_when_it_can() -> None:
    container = AdaptiveEdgeContainer(2, slots=5)
    candidates = torch.arange(9.0).repeat(2, 1).t()  # row i is (i, i)
    container.initialize(candidates, _seeded(0))
    ids = container.bank[:, 0].long().tolist()
    assert len(set(ids)) == 5 and set(ids) <= set(range(9))


@pytest.mark.parametrize(("count", "slots"), [(1, 4), (3, 8), (4, 8), (5, 5)])
def test_fewer_candidates_are_used_evenly(count: int, slots: int) -> None:
    container = AdaptiveEdgeContainer(1, slots=slots)
    container.initialize(torch.arange(float(count)).view(count, 1), _seeded(1))
    uses = torch.bincount(container.bank[:, 0].long(), minlength=count)
    assert uses.sum() == slots
    assert uses.min() >= slots // count and uses.max() <= -(-slots // count)


def test_draw_is_reproducible_and_random() -> None:
    device = torch.device("cpu")
    assert torch.equal(_draw(50, 10, _seeded(0), device), _draw(50, 10, _seeded(0), device))
    assert not torch.equal(_draw(50, 10, _seeded(0), device), _draw(50, 10, _seeded(1), device))


@given(slots=st.integers(1, 16), channels=st.integers(1, 6), counts=st.lists(st.integers(0, 40), min_size=1, max_size=4))
def test_bank_shape_never_changes(slots: int, channels: int, counts: list[int]) -> None:
    container = AdaptiveEdgeContainer(channels, slots=slots)
    for count in counts:
        out = container.update(torch.randn(count, channels))
        assert out.shape == (slots, channels) == container.bank.shape
        assert torch.isfinite(out).all()
        assert container.prototype().shape == (channels,)
    assert bool(container.initialized) == any(c > 0 for c in counts)


# --- persistence and dtype --------------------------------------------------------------------


def test_bank_and_flag_survive_a_state_dict_round_trip() -> None:
    container = _ready(4, 6)
    container.update(torch.randn(9, 4))
    buffer = io.BytesIO()
    torch.save(container.state_dict(), buffer)
    buffer.seek(0)
    fresh = AdaptiveEdgeContainer(4, slots=6)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert bool(fresh.initialized)
    assert torch.equal(fresh.bank, container.bank)
    assert torch.equal(fresh.prototype(), container.prototype())


def test_to_double_converts_the_bank_and_keeps_the_flag_bool() -> None:
    container = _ready(3, 4).double()
    assert container.bank.dtype == torch.float64 and container.initialized.dtype == torch.bool
    out = container.update(torch.randn(5, 3))  # float32 candidates are cast to the bank's dtype
    assert out.dtype == torch.float64


def test_prototype_is_the_mean_of_a_given_bank() -> None:
    container = AdaptiveEdgeContainer(2, slots=2)
    bank = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    assert torch.equal(container.prototype(bank), torch.tensor([2.0, 2.0]))


def test_extra_repr() -> None:
    assert "channels=4, slots=6" in repr(AdaptiveEdgeContainer(4, slots=6))


@pytest.mark.skipif("cuda" not in DEVICES, reason="needs CUDA")
def test_cuda_equals_cpu() -> None:
    cpu = _ready(4, 6)
    gpu = _ready(4, 6).cuda()
    candidates = torch.randn(9, 4)
    gpu.update(candidates.cuda(), torch.Generator("cpu").manual_seed(0))
    cpu.update(candidates, _seeded(0))
    torch.testing.assert_close(gpu.bank.cpu(), cpu.bank)


# --- torch.distributed ------------------------------------------------------------------------

# Candidate counts per call, one list per rank: they differ between ranks, and each rank has a
# step with no candidates; at step 3 neither rank has any, so the bank must stay as it is.
SCHEDULE = [[5, 10, 0, 0, 2, 30], [0, 3, 7, 0, 20, 1]]
CHANNELS, SLOTS = 4, 8


def _candidates(rank: int, step: int) -> torch.Tensor:
    return torch.randn(SCHEDULE[rank][step], CHANNELS, generator=_seeded(100 * rank + step))


def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # the global RNGs differ between ranks
        generator = _seeded(1000 + rank)  # so do the generators: only rank 0's may be used
        container = AdaptiveEdgeContainer(CHANNELS, slots=SLOTS)
        banks = []
        for step in range(len(SCHEDULE[rank])):
            if step == 0:
                container.initialize(_candidates(rank, step), generator)
            else:
                out = container.update(_candidates(rank, step), generator)
                out.sum().backward()
            banks.append(container.bank.clone())
        torch.save(banks, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_hold_identical_banks(tmp_path: Path) -> None:
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        assert torch.equal(a, b), f"ranks disagree after step {step}"
    assert torch.equal(rank0[3], rank0[2])  # no candidates anywhere: no update
    assert all(not torch.equal(rank0[s], rank0[s - 1]) for s in (1, 2, 4, 5))

    # The same as one process fed every rank's candidates (rank order) with rank 0's generator.
    single = AdaptiveEdgeContainer(CHANNELS, slots=SLOTS)
    generator = _seeded(1000)
    for step in range(len(SCHEDULE[0])):
        candidates = torch.cat([_candidates(0, step), _candidates(1, step)])
        if step == 0:
            single.initialize(candidates, generator)
        else:
            single.update(candidates, generator)
        torch.testing.assert_close(single.bank, rank0[step])


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("candidates", "error", "message"),
    [
        (torch.randn(5, 3), ValueError, r"candidates must have shape \(n, C\) with C = 4 .* got \(5, 3\)"),
        (torch.randn(5, 4, 1), ValueError, r"candidates must be 2-D \(n, C\), got 3-D"),
        (torch.randn(4), ValueError, r"candidates must be 2-D \(n, C\), got 1-D"),
        (torch.ones(5, 4, dtype=torch.long), ValueError, r"candidates must be a floating-point tensor"),
        (torch.empty(5, 4, device="meta"), ValueError, r"candidates must be on the same device as the bank \(cpu\), got meta"),
        ([[1.0] * 4], TypeError, r"candidates must be a torch.Tensor, got list"),
    ],
)
@pytest.mark.parametrize("method", ["initialize", "update"])
def test_bad_candidates_raise(candidates: object, error: type[Exception], message: str, method: str) -> None:
    container = AdaptiveEdgeContainer(4, slots=3)
    with pytest.raises(error, match=message):
        getattr(container, method)(candidates)


def test_bad_generator_raises() -> None:
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, got int"):
        AdaptiveEdgeContainer(4, slots=3).update(torch.randn(5, 4), 0)  # type: ignore[arg-type]


def test_bad_constructor_arguments_raise() -> None:
    with pytest.raises(ValueError, match=r"slots must be a positive int, got 0"):
        AdaptiveEdgeContainer(4, slots=0)
    with pytest.raises(ValueError, match=r"channels must be a positive int, got -1"):
        AdaptiveEdgeContainer(-1)
    with pytest.raises(TypeError, match=r"channels must be an int, got float"):
        AdaptiveEdgeContainer(4.0)  # type: ignore[arg-type]


def test_bank_of_the_wrong_shape_raises() -> None:
    container = AdaptiveEdgeContainer(4, slots=3)
    with pytest.raises(ValueError, match=r"bank must have shape \(slots, C\) = \(3, 4\), got \(2, 4\)"):
        container.prototype(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"bank must be a floating-point tensor"):
        container.prototype(torch.ones(3, 4, dtype=torch.long))
