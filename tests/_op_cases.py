"""The calls, cases and comparisons of the shared op tester (tests/op_tester.py).

A :class:`Call` holds the arguments of one call of an op; the case classes name calls for each
check; :func:`assert_matches` compares outputs field by field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
from torch import Tensor, nn

from tests.conftest import TOLERANCES

EXACT: Mapping[str, float] = MappingProxyType({"atol": 0.0, "rtol": 0.0})
# torch.compile against eager: the same float32 math in another order
COMPILE_TOLERANCE: Mapping[str, float] = MappingProxyType({"atol": 1e-5, "rtol": 1e-5})


def tolerance(dtype: torch.dtype | None) -> Mapping[str, float]:
    """The shared tolerance against a reference for ``dtype``; exact for integer and bool data."""
    return TOLERANCES.get(dtype, EXACT) if dtype is not None else EXACT


# --- calls and cases --------------------------------------------------------------------------


def _fresh(value: Any) -> Any:
    """A generator in the same state (so each invocation draws the same numbers); others as is."""
    if isinstance(value, torch.Generator):
        clone = torch.Generator(value.device)
        clone.set_state(value.get_state())
        return clone
    return value


@dataclass(frozen=True)
class Call:
    """The arguments of one call of an op; ``call(fn)`` runs ``fn`` on them."""

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)

    def __call__(self, fn: Callable[..., Any]) -> Any:
        return fn(*(_fresh(a) for a in self.args), **{k: _fresh(v) for k, v in self.kwargs.items()})

    def _map(self, fn: Callable[[Tensor], Tensor], *, floating_only: bool) -> Call:
        # once per tensor object: FPA's partner=x must stay the very same tensor as x
        seen: dict[int, Tensor] = {}

        def one(value: Any) -> Any:
            if isinstance(value, Tensor) and (value.is_floating_point() or not floating_only):
                if id(value) not in seen:
                    seen[id(value)] = fn(value)
                return seen[id(value)]
            return value

        return Call(tuple(one(a) for a in self.args), {k: one(v) for k, v in self.kwargs.items()})

    def double(self) -> Call:
        """Floating-point tensors in float64 and detached, for a reference."""
        return self._map(lambda t: t.detach().double(), floating_only=True)

    def to(self, device: str, dtype: torch.dtype | None = None) -> Call:
        """Every tensor on ``device``, floating ones in ``dtype``; leaves keep ``requires_grad``.

        Generators stay where they are: every op draws on its generator's device.
        """

        def move(t: Tensor) -> Tensor:
            if not t.is_floating_point():
                return t.to(device)
            return t.detach().to(device, dtype or t.dtype).requires_grad_(t.requires_grad)

        return self._map(move, floating_only=False)

    def grad_inputs(self) -> list[Tensor]:
        """The distinct tensor arguments that require grad, in argument order."""
        found: dict[int, Tensor] = {}
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor) and value.requires_grad:
                found.setdefault(id(value), value)
        return list(found.values())

    def replaced(self, tensors: Sequence[Tensor]) -> Call:
        """This call with :meth:`grad_inputs` replaced, in order, by ``tensors`` (for gradcheck)."""
        new = {id(old): t for old, t in zip(self.grad_inputs(), tensors, strict=True)}
        return self._map(lambda t: new.get(id(t), t), floating_only=False)

    @property
    def dtype(self) -> torch.dtype | None:
        """The dtype of the first tensor argument: the one the op's tolerance is chosen by."""
        for value in (*self.args, *self.kwargs.values()):
            if isinstance(value, Tensor):
                return value.dtype
        return None


@dataclass(frozen=True)
class BadInput:
    """``call()`` must raise ``error`` with a message matching the regular expression ``match``."""

    id: str
    call: Callable[[], object]
    error: type[Exception]
    match: str


@dataclass(frozen=True)
class Case:
    """A named call of the op; ``build()`` (``build(dtype)`` for reference cases) makes it.

    The fields after ``tol`` are read by the degenerate check only.
    """

    id: str
    build: Callable[..., Call]
    tol: Mapping[str, float] | None = None  # instead of tolerance(dtype)
    dtypes: Sequence[torch.dtype] | None = None  # a reference case in these only
    shape: tuple[int, ...] | None = None  # the shape of every output tensor
    reference: bool = False  # also equal to the reference
    gradcheck: bool = False  # also pass gradcheck (build() in float64)
    unused_ok: bool = False  # an input may get no gradient (None) at all
    check: Callable[[Call, Any], None] | None = None  # op-specific expectations


@dataclass(frozen=True)
class ModuleCase:
    """``build()`` returns a module and a call of its forward."""

    id: str
    build: Callable[[], tuple[nn.Module, Call]]


@dataclass(frozen=True)
class ReprCase:
    """``repr(module())`` contains every one of ``parts`` and none of ``absent``."""

    id: str
    module: Callable[[], nn.Module]
    parts: Sequence[str]
    absent: Sequence[str] = ()


@dataclass(frozen=True)
class StateCase:
    """``build()`` returns (module, a fresh module, probe); after loading the module's state into
    the fresh one, ``probe`` must read the same from both."""

    id: str
    build: Callable[[], tuple[nn.Module, nn.Module, Callable[[nn.Module], Any]]]


@dataclass(frozen=True)
class RunCase:
    """``build()`` returns a callable (a function, a lambda or a module) and a call of it.

    Compile cases compare ``torch.compile(fn, fullgraph=True)`` with ``fn``; device cases compare
    the call moved to CUDA (floating tensors in ``dtype``) with the CPU one. ``loss`` turns the
    output into the scalar whose gradients are compared (by default the sum of squares of every
    floating output that requires grad, a scalar output itself); ``grad_tol`` gives one
    tolerance per gradient; ``compare`` replaces the whole comparison of the outputs.
    """

    id: str
    build: Callable[[], tuple[Callable[..., Any], Call]]
    tol: Mapping[str, float] = field(default_factory=lambda: COMPILE_TOLERANCE)
    grad_tol: Sequence[Mapping[str, float]] | None = None
    dtype: torch.dtype | None = None
    loss: Callable[[Any], Tensor] | None = None
    compare: Callable[[Any, Any], None] | None = None
    context: Callable[[], AbstractContextManager[Any]] = nullcontext


# --- comparing outputs ------------------------------------------------------------------------


def tensors_of(out: Any) -> Iterator[Tensor]:
    """The tensors of an output: itself, or the fields of a NamedTuple / tuple."""
    if isinstance(out, Tensor):
        yield out
    elif isinstance(out, tuple):
        for item in out:
            yield from tensors_of(item)


def assert_matches(actual: Any, expected: Any, tol: Mapping[str, float]) -> None:
    """Equal field by field: floating tensors within ``tol`` (in the expected dtype and device),
    integer and bool tensors exactly, anything else by ``==``."""
    if isinstance(actual, tuple):
        assert isinstance(expected, tuple) and len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_matches(a, e, tol)
    elif isinstance(actual, Tensor):
        assert isinstance(expected, Tensor) and actual.shape == expected.shape
        if actual.is_floating_point():
            torch.testing.assert_close(actual.to(expected.device, expected.dtype), expected, **tol)
        else:
            assert actual.dtype == expected.dtype and torch.equal(actual.cpu(), expected.cpu())
    else:
        assert actual == expected


def default_loss(out: Any) -> Tensor | None:
    """A scalar output itself, else the sum of squares of the floating outputs; None if no grad."""
    parts = [t if t.ndim == 0 else t.square().sum() for t in tensors_of(out) if t.requires_grad]
    return torch.stack(parts).sum() if parts else None


def gradients(loss: Tensor | None, inputs: Sequence[Tensor], *, retain: bool = False) -> list[Tensor | None]:
    """d loss / d inputs, None for an input the loss does not reach."""
    if loss is None or not inputs:
        return []
    return list(torch.autograd.grad(loss, list(inputs), allow_unused=True, retain_graph=retain))


def assert_same_gradients(
    got: Sequence[Tensor | None], want: Sequence[Tensor | None], tols: Sequence[Mapping[str, float]]
) -> None:
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert (g is None) == (w is None), f"gradient {i}: {g is None=} but {w is None=}"
        if g is not None and w is not None:
            torch.testing.assert_close(g.to(w.device, w.dtype), w, **tols[i])
