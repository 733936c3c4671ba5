"""One checklist for every op (style rule 12), written once and run for each op.

An op's test file declares ``class TestXxxOp(OpTester)`` and supplies the public function, its
slow dense reference and cases; pytest collects the checks below once per subclass, each case a
parametrized test, so a check is written here once instead of being copied into every file (as
torchvision's ``RoIOpTester`` and kornia's ``BaseTester`` do).

=================================================  ======================================
check                                              fed by
=================================================  ======================================
bad input raises, matching the message             ``bad_inputs()``
hypothesis shapes (and values vs the reference)    ``strategies()`` + ``check_output()``
values and gradients vs the reference              ``reference_cases()`` x ``reference_dtypes``
``gradcheck`` in float64                           ``gradcheck_cases()``
module == function                                 ``module_cases()`` + ``module_as_function()``
``extra_repr`` shows every hyper-parameter         ``repr_cases()``
``state_dict`` round trip                          ``state_cases()``
``torch.compile(fullgraph=True)`` == eager         ``compile_cases()``
CUDA == CPU (skipped without CUDA)                 ``device_cases()``
degenerate input: all-ignored, empty, 1x1, odd B   ``degenerate_cases()``
=================================================  ======================================

A check that cannot apply to an op (a function without a module, an op without a gradient) is
named in ``not_applicable`` with the reason. A subclass that neither feeds a check nor says why
it does not apply fails at import, so a check is never dropped by forgetting it.

Cases are built inside the test, after ``conftest``'s seed, and a :class:`Call` hands every
invocation fresh copies of its generators, so the function, the reference and the module all
draw the same random numbers.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

from tests._op_cases import (
    EXACT,
    BadInput,
    Call,
    Case,
    ModuleCase,
    ReprCase,
    RunCase,
    StateCase,
    assert_matches,
    assert_same_gradients,
    default_loss,
    gradients,
    tensors_of,
    tolerance,
)
from tests.conftest import compile_available

__all__ = [
    "CHECKS",
    "BadInput",
    "Call",
    "Case",
    "ModuleCase",
    "OpTester",
    "ReprCase",
    "RunCase",
    "StateCase",
]


# --- the tester -------------------------------------------------------------------------------

# check -> (the hook that feeds it, the test methods it runs)
CHECKS: Mapping[str, tuple[str, tuple[str, ...]]] = {
    "bad_input": ("bad_inputs", ("test_bad_input_raises",)),
    "property": ("strategies", ("test_property",)),
    "reference": ("reference_cases", ("test_value_and_gradient_match_reference",)),
    "gradcheck": ("gradcheck_cases", ("test_gradcheck",)),
    "module": ("module_cases", ("test_module_equals_function",)),
    "repr": ("repr_cases", ("test_extra_repr_shows_every_hyper_parameter",)),
    "state_dict": ("state_cases", ("test_state_dict_round_trip",)),
    "compile": ("compile_cases", ("test_compiled_equals_eager",)),
    "cuda": ("device_cases", ("test_cuda_equals_cpu",)),
    "degenerate": ("degenerate_cases", ("test_degenerate_input",)),
}

# test argument -> the hook that parametrizes it
_PARAMETERS = {
    "bad_input": "bad_inputs",
    "gradcheck_case": "gradcheck_cases",
    "module_case": "module_cases",
    "repr_case": "repr_cases",
    "state_case": "state_cases",
    "compile_case": "compile_cases",
    "device_case": "device_cases",
    "degenerate_case": "degenerate_cases",
}


class OpTester:
    """Base class of one op's checks; see the module docstring for the hooks."""

    function: ClassVar[Callable[..., Any]]  # the public function, as staticmethod(...)
    reference: ClassVar[Callable[..., Any] | None] = None  # same arguments, slow and literal
    not_applicable: ClassVar[Mapping[str, str]] = {}  # check -> why it does not apply
    reference_dtypes: ClassVar[Sequence[torch.dtype]] = (torch.float32, torch.float64)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        unknown = set(cls.not_applicable) - set(CHECKS)
        if unknown:
            raise TypeError(f"{cls.__name__}.not_applicable names unknown checks {sorted(unknown)}")
        for check, (hook, tests) in CHECKS.items():
            supplied = getattr(cls, hook) is not getattr(OpTester, hook)
            reason = cls.not_applicable.get(check)
            if supplied == (reason is not None):
                raise TypeError(
                    f"{cls.__name__}: either supply {hook}() or say in not_applicable[{check!r}] "
                    f"why the {check} check does not apply, not both and not neither"
                )
            if reason is not None:
                for test in tests:
                    setattr(cls, test, None)  # pytest collects only callables
        if "reference" not in cls.not_applicable and getattr(cls, "reference", None) is None:
            raise TypeError(f"{cls.__name__} supplies reference_cases() but no reference")
        if "property" not in cls.not_applicable and cls.check_output is OpTester.check_output:
            raise TypeError(f"{cls.__name__} supplies strategies() but no check_output()")

    # --- hooks: an op overrides the ones its checks need ----------------------------------

    def bad_inputs(self) -> list[BadInput]:
        raise NotImplementedError

    def strategies(self) -> Mapping[str, st.SearchStrategy[Call]]:
        raise NotImplementedError

    def check_output(self, call: Call, out: Any) -> None:
        """Op-specific expectations on a drawn call's output: shape, dtype, invariants."""
        raise NotImplementedError

    def property_tolerance(self, call: Call, reference: Any) -> Mapping[str, float]:
        """Tolerance of the property check against the float64 reference."""
        return tolerance(call.dtype)

    def reference_cases(self) -> list[Case]:
        raise NotImplementedError

    def gradcheck_cases(self) -> list[Case]:
        raise NotImplementedError

    def module_cases(self) -> list[ModuleCase]:
        raise NotImplementedError

    def module_as_function(self, module: nn.Module) -> Callable[..., Any]:
        """The function call a module's forward must equal, with the module's hyper-parameters."""
        raise NotImplementedError

    def module_output(self, out: Any) -> Any:
        """The part of the module's output that the function returns."""
        return out

    def repr_cases(self) -> list[ReprCase]:
        raise NotImplementedError

    def state_cases(self) -> list[StateCase]:
        raise NotImplementedError

    def compile_cases(self) -> list[RunCase]:
        raise NotImplementedError

    def device_cases(self) -> list[RunCase]:
        raise NotImplementedError

    def degenerate_cases(self) -> list[Case]:
        raise NotImplementedError

    # --- parametrization --------------------------------------------------------------------

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        names = metafunc.fixturenames
        for argument, hook in _PARAMETERS.items():
            if argument in names:
                cases = getattr(self, hook)()
                _check_ids(type(self).__name__, hook, [c.id for c in cases])
                metafunc.parametrize(argument, cases, ids=[c.id for c in cases])
        if "strategy_name" in names:
            metafunc.parametrize("strategy_name", sorted(self.strategies()))
        if "reference_case" in names:
            cases = self.reference_cases()
            _check_ids(type(self).__name__, "reference_cases", [c.id for c in cases])
            pairs = [(case, dtype) for case in cases for dtype in (case.dtypes or self.reference_dtypes)]
            ids = [f"{case.id}-{str(dtype).removeprefix('torch.')}" for case, dtype in pairs]
            metafunc.parametrize(("reference_case", "dtype"), pairs, ids=ids)

    # --- the checks -------------------------------------------------------------------------

    def test_bad_input_raises(self, bad_input: BadInput) -> None:
        with pytest.raises(bad_input.error, match=bad_input.match):
            bad_input.call()

    def test_property(self, strategy_name: str) -> None:
        # @given on an inner function, not on this method: hypothesis fails a method that runs
        # on several instances (one per parametrized case and per subclass here)
        @given(call=self.strategies()[strategy_name])
        def run(call: Call) -> None:
            self._check_property(call)

        run()

    def _check_property(self, call: Call) -> None:
        out = call(type(self).function)
        for t in tensors_of(out):
            if t.is_floating_point():
                assert torch.isfinite(t).all()
        self.check_output(call, out)
        reference = type(self).reference
        if reference is not None:
            expected = call.double()(reference)
            assert_matches(out, expected, self.property_tolerance(call, expected))

    def test_value_and_gradient_match_reference(self, reference_case: Case, dtype: torch.dtype) -> None:
        call = reference_case.build(dtype)
        reference = type(self).reference
        assert reference is not None
        out, expected = call(type(self).function), call(reference)
        tol = reference_case.tol or tolerance(dtype)
        assert_matches(out, expected, tol)
        outs = [t for t in tensors_of(out) if t.requires_grad]
        refs = [t for t in tensors_of(expected) if t.requires_grad]
        inputs = call.grad_inputs()
        if outs and inputs:
            upstream = [torch.randn_like(t) for t in outs]
            got = torch.autograd.grad(outs, inputs, upstream, allow_unused=True)
            want = torch.autograd.grad(refs, inputs, upstream, allow_unused=True)
            assert_same_gradients(got, want, [tol] * len(inputs))

    def _gradcheck(self, call: Call) -> None:
        inputs = call.grad_inputs()
        assert inputs and all(t.dtype == torch.float64 for t in inputs), "gradcheck needs float64 leaves"

        def fn(*tensors: Tensor) -> tuple[Tensor, ...]:
            out = call.replaced(tensors)(type(self).function)
            return tuple(t for t in tensors_of(out) if t.is_floating_point())

        assert torch.autograd.gradcheck(fn, tuple(inputs))

    def test_gradcheck(self, gradcheck_case: Case) -> None:
        self._gradcheck(gradcheck_case.build())

    def test_module_equals_function(self, module_case: ModuleCase) -> None:
        module, call = module_case.build()
        expected = call(self.module_as_function(module))
        assert_matches(self.module_output(call(module)), expected, EXACT)

    def test_extra_repr_shows_every_hyper_parameter(self, repr_case: ReprCase) -> None:
        text = repr(repr_case.module())
        for part in repr_case.parts:
            assert part in text, f"{part!r} not in {text!r}"
        for part in repr_case.absent:
            assert part not in text, f"{part!r} in {text!r}"

    def test_state_dict_round_trip(self, state_case: StateCase) -> None:
        module, fresh, probe = state_case.build()
        buffer = io.BytesIO()
        torch.save(module.state_dict(), buffer)
        buffer.seek(0)
        fresh.load_state_dict(torch.load(buffer, weights_only=True))
        assert_matches(probe(fresh), probe(module), EXACT)

    @pytest.mark.slow
    @pytest.mark.skipif(not compile_available(), reason="inductor needs a C++ compiler")
    def test_compiled_equals_eager(self, compile_case: RunCase) -> None:
        fn, call = compile_case.build()
        loss = compile_case.loss or default_loss
        params = list(fn.parameters()) if isinstance(fn, nn.Module) else []
        inputs = [*call.grad_inputs(), *params]
        eager = call(fn)
        # retain: the eager and the compiled pass may share a graph (EPA's in-graph bank)
        eager_grads = gradients(loss(eager), inputs, retain=True)
        compiled = torch.compile(fn, fullgraph=True)
        out = call(compiled)
        grads = gradients(loss(out), inputs)
        self._compare_runs(compile_case, out, eager, grads, eager_grads)

    @pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    def test_cuda_equals_cpu(self, device_case: RunCase) -> None:
        self.check_device(device_case, "cuda")

    def check_device(self, case: RunCase, device: str) -> None:
        """The case's call on ``device`` (floating tensors in ``case.dtype``) equals it on the CPU.

        tests/test_op_tester.py runs this with ``device="cpu"``, so the path is exercised on
        machines without a GPU too.
        """
        fn, call = case.build()
        loss = case.loss or default_loss
        want = call(fn)
        want_grads = gradients(loss(want), call.grad_inputs())
        moved_fn = copy.deepcopy(fn).to(device, case.dtype) if isinstance(fn, nn.Module) else fn
        moved = call.to(device, case.dtype)
        with case.context():
            got = moved(moved_fn)
            got_grads = gradients(loss(got), moved.grad_inputs())
        for t in tensors_of(got):
            assert t.device.type == device
        self._compare_runs(case, got, want, got_grads, want_grads)

    @staticmethod
    def _compare_runs(
        case: RunCase, out: Any, expected: Any, grads: Sequence[Tensor | None], expected_grads: Sequence[Tensor | None]
    ) -> None:
        if case.compare is not None:
            case.compare(out, expected)
        else:
            assert_matches(out, expected, case.tol)
        assert_same_gradients(grads, expected_grads, case.grad_tol or [case.tol] * len(grads))

    def test_degenerate_input(self, degenerate_case: Case) -> None:
        case = degenerate_case
        call = case.build()
        out = call(type(self).function)
        for t in tensors_of(out):
            if t.is_floating_point():
                assert torch.isfinite(t).all()
            if case.shape is not None:
                assert t.shape == case.shape
        inputs = call.grad_inputs()
        grads = gradients(default_loss(out), inputs, retain=True)  # retain: case.check may differentiate
        assert len(grads) == len(inputs), "the output must reach the inputs that require grad"
        for g, t in zip(grads, inputs):
            assert g is not None or case.unused_ok
            if g is not None:
                assert g.shape == t.shape and torch.isfinite(g).all()
        if case.reference:
            reference = type(self).reference
            assert reference is not None
            assert_matches(out, call(reference), case.tol or tolerance(call.dtype))
        if case.gradcheck:
            self._gradcheck(call)
        if case.check is not None:
            case.check(call, out)


def _check_ids(owner: str, hook: str, ids: list[str]) -> None:
    if len(set(ids)) != len(ids):
        raise ValueError(f"{owner}.{hook}() repeats a case id: {sorted(ids)}")
