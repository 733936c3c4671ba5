"""AdaptiveEdgeContainer: the shared checklist (tests/op_tester.py) on the update of Eq. 7, and the
container's own tests (learning, persistence, candidate counts, torch.distributed)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call

from cscpa_layers import AdaptiveEdgeContainer
from cscpa_layers._reference.edge_attention import container_update_dense
from cscpa_layers.edge_container import _draw
from tests.op_tester import BadInput, Call, Case, OpTester, ReprCase, RunCase, StateCase


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ready(channels: int = 4, slots: int = 6, dtype: torch.dtype = torch.float32) -> AdaptiveEdgeContainer:
    container = AdaptiveEdgeContainer(channels, slots=slots).to(dtype)
    container.initialize(torch.randn(2 * slots, channels, dtype=dtype), _seeded(0))
    return container


class _Update(nn.Module):
    """``forward`` is the container's ``update``, so that torch.func can call it on given state."""

    def __init__(self, container: AdaptiveEdgeContainer) -> None:
        super().__init__()
        self.container = container

    def forward(self, candidates: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        return self.container.update(candidates, generator)


def container_update(
    candidates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bank: torch.Tensor, *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """:meth:`AdaptiveEdgeContainer.update` as a function of the state it reads: the mixer's
    weight and bias and the stored bank C_{h-1} (an initialised container). Returns C_h."""
    slots, channels = bank.shape
    module = _Update(AdaptiveEdgeContainer(channels, slots=slots).to(bank.dtype))
    state = {
        "container.mixer.weight": weight,
        "container.mixer.bias": bias,
        "container.bank": bank.clone(),  # update writes the new bank into it; the caller's stays
        "container.initialized": torch.tensor(True, device=bank.device),
    }
    out: torch.Tensor = functional_call(module, state, (candidates, generator))
    return out


def container_update_reference(
    candidates: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, bank: torch.Tensor, *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Eq. 7 written out, on the rows the layer's draw picks with the same generator state."""
    drawn = candidates[_draw(candidates.shape[0], bank.shape[0], generator, candidates.device)]
    return container_update_dense(drawn.to(bank.dtype), bank, weight, bias)


def _update_call(
    count: int, channels: int, slots: int, dtype: torch.dtype, *, seed: int = 5, trained: bool = True
) -> Call:
    """Candidates, a mixer (trained-looking, or the initial blend) that requires grad, and a bank."""
    blend = AdaptiveEdgeContainer(channels, slots=slots).to(dtype).mixer
    weight = torch.randn(slots, 2 * slots, dtype=dtype) if trained else blend.weight.detach().clone()
    bias = torch.randn(slots, dtype=dtype) if trained else blend.bias.detach().clone()
    candidates = torch.randn(count, channels, dtype=dtype)
    bank = torch.randn(slots, channels, dtype=dtype)
    return Call((candidates, weight.requires_grad_(), bias.requires_grad_(), bank), {"generator": _seeded(seed)})


@st.composite
def update_calls(draw: st.DrawFn) -> Call:
    slots, channels, count = draw(st.integers(1, 16)), draw(st.integers(1, 6)), draw(st.integers(1, 40))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    return _update_call(count, channels, slots, dtype, seed=draw(st.integers(0, 2**16)), trained=draw(st.booleans()))


class TestAdaptiveEdgeContainerUpdateOp(OpTester):
    function = staticmethod(container_update)
    reference = staticmethod(container_update_reference)
    not_applicable = {
        "module": "the container is the module; the function checked here is built from it",
        "compile": "update's candidate count is data-dependent: documented as not for torch.compile(fullgraph=True)",
    }

    def bad_inputs(self) -> list[BadInput]:
        cases = []
        for name, candidates, error, message in [
            ("channels", torch.randn(5, 3), ValueError, r"candidates must have shape \(n, C\) with C = 4 .* got \(5, 3\)"),
            ("rank-3", torch.randn(5, 4, 1), ValueError, r"candidates must be 2-D \(n, C\), got 3-D"),
            ("rank-1", torch.randn(4), ValueError, r"candidates must be 2-D \(n, C\), got 1-D"),
            ("integer", torch.ones(5, 4, dtype=torch.long), ValueError, r"candidates must be a floating-point tensor"),
            ("device", torch.empty(5, 4, device="meta"), ValueError,
             r"candidates must be on the same device as the bank \(cpu\), got meta"),
            ("type", [[1.0] * 4], TypeError, r"candidates must be a torch.Tensor, got list"),
        ]:
            for method in ("initialize", "update"):
                cases.append(BadInput(f"candidates-{name}-{method}",
                                      lambda c=candidates, m=method: getattr(AdaptiveEdgeContainer(4, slots=3), m)(c),
                                      error, message))
        container = AdaptiveEdgeContainer
        return [
            *cases,
            BadInput("initialize-from-0-candidates", lambda: container(4, slots=3).initialize(torch.empty(0, 4)), ValueError,
                     r"cannot initialize the edge container from 0 candidates"),
            BadInput("generator", lambda: container(4, slots=3).update(torch.randn(5, 4), 0), TypeError,  # type: ignore[arg-type]
                     r"generator must be a torch.Generator or None, got int"),
            BadInput("slots", lambda: container(4, slots=0), ValueError, r"slots must be a positive int, got 0"),
            BadInput("channels", lambda: container(-1), ValueError, r"channels must be a positive int, got -1"),
            BadInput("channels-type", lambda: container(4.0), TypeError, r"channels must be an int, got float"),  # type: ignore[arg-type]
            BadInput("bank-shape", lambda: container(4, slots=3).prototype(torch.randn(2, 4)), ValueError,
                     r"bank must have shape \(slots, C\) = \(3, 4\), got \(2, 4\)"),
            BadInput("bank-integer", lambda: container(4, slots=3).prototype(torch.ones(3, 4, dtype=torch.long)), ValueError,
                     r"bank must be a floating-point tensor"),
        ]

    def strategies(self) -> dict[str, st.SearchStrategy[Call]]:
        return {"candidates-slots-channels": update_calls()}

    def check_output(self, call: Call, out: torch.Tensor) -> None:
        bank = call.args[3]
        assert out.shape == bank.shape and out.dtype == bank.dtype

    def reference_cases(self) -> list[Case]:
        return [
            Case("trained-mixer", lambda dtype: _update_call(7, 5, 4, dtype)),
            Case("blend-mixer", lambda dtype: _update_call(9, 4, 6, dtype, trained=False)),
            Case("fewer-candidates-than-slots", lambda dtype: _update_call(3, 4, 8, dtype)),
        ]

    def gradcheck_cases(self) -> list[Case]:
        return [
            Case("trained-mixer", lambda: _update_call(5, 3, 4, torch.float64, seed=7)),
            Case("fewer-candidates-than-slots", lambda: _update_call(2, 3, 5, torch.float64, seed=7)),
        ]

    def repr_cases(self) -> list[ReprCase]:
        return [ReprCase("channels-slots", lambda: AdaptiveEdgeContainer(4, slots=6), ("channels=4, slots=6",))]

    def state_cases(self) -> list[StateCase]:
        def build() -> tuple[nn.Module, nn.Module, object]:
            container = _ready(4, 6)
            container.update(torch.randn(9, 4))
            probe = lambda c: (c.initialized, c.bank, c.prototype())  # noqa: E731
            return container, AdaptiveEdgeContainer(4, slots=6), probe

        return [StateCase("initialized-and-updated", build)]  # type: ignore[arg-type]

    def device_cases(self) -> list[RunCase]:
        # a CPU generator draws the same rows for CUDA data: the draw runs on its device
        return [RunCase("cpu-generator", lambda: (container_update, _update_call(9, 4, 6, torch.float32, seed=0)),
                        tol={"atol": 1e-5, "rtol": 1.3e-6})]

    def degenerate_cases(self) -> list[Case]:
        def kept(call: Call, out: torch.Tensor) -> None:
            assert torch.equal(out, call.args[3])  # the bank as it was
            weight, bias = call.args[1:3]
            for grad in torch.autograd.grad(out.sum(), [weight, bias]):  # in the graph, zero gradient
                assert not grad.any()

        return [
            Case("zero-candidates", lambda: _update_call(0, 4, 6, torch.float32), shape=(6, 4), check=kept),
            Case("one-candidate", lambda: _update_call(1, 4, 6, torch.float64), shape=(6, 4), reference=True, gradcheck=True),
            Case("one-slot-one-channel", lambda: _update_call(3, 1, 1, torch.float64), shape=(1, 1), reference=True),
        ]


# --- the container's own tests ------------------------------------------------------------------


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


# --- learning and the graph ------------------------------------------------------------------------


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


# --- candidate counts ------------------------------------------------------------------------------


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


# --- dtype and the prototype -----------------------------------------------------------------------


def test_to_double_converts_the_bank_and_keeps_the_flag_bool() -> None:
    container = _ready(3, 4).double()
    assert container.bank.dtype == torch.float64 and container.initialized.dtype == torch.bool
    out = container.update(torch.randn(5, 3))  # float32 candidates are cast to the bank's dtype
    assert out.dtype == torch.float64


def test_prototype_is_the_mean_of_a_given_bank() -> None:
    container = AdaptiveEdgeContainer(2, slots=2)
    bank = torch.tensor([[1.0, 4.0], [3.0, 0.0]])
    assert torch.equal(container.prototype(bank), torch.tensor([2.0, 2.0]))


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
