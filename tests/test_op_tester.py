"""The shared op tester itself: it refuses an op that skips a check silently, and its CUDA path
runs (on the CPU) on machines without a GPU."""

from __future__ import annotations

from typing import Any

import pytest
import torch

# modules, not classes: a Test* class imported here would be collected here a second time
import tests.test_affinity_loss as affinity_loss
import tests.test_confidence_mask as confidence_mask
import tests.test_edge_attention as edge_attention
import tests.test_edge_container as edge_container
import tests.test_edge_features as edge_features
import tests.test_prototype_attention as prototype_attention
import tests.test_pseudo_labels as pseudo_labels
from tests.op_tester import CHECKS, BadInput, OpTester, RunCase

OPS: list[type[OpTester]] = [
    edge_container.TestAdaptiveEdgeContainerUpdateOp,
    confidence_mask.TestConfidenceMaskOp,
    edge_features.TestEdgeMaskOp,
    edge_attention.TestEdgePrototypeAttentionOp,
    pseudo_labels.TestEntropyKeepMaskOp,
    prototype_attention.TestForegroundPrototypeAttentionOp,
    affinity_loss.TestPixelAffinityLossOp,
    affinity_loss.TestPixelAffinityOp,
    pseudo_labels.TestPseudoLabelsOp,
    edge_features.TestSelectEdgeFeaturesOp,
]

ALL_BUT_BAD_INPUT = {check: "not fed in this test" for check in CHECKS if check != "bad_input"}


def _bad_inputs(self: Any) -> list[BadInput]:
    return []


def test_an_op_must_feed_each_check_or_say_why_not() -> None:
    with pytest.raises(TypeError, match=r"either supply bad_inputs\(\) or say in not_applicable\['bad_input'\] why"):
        type("Silent", (OpTester,), {"not_applicable": ALL_BUT_BAD_INPUT})
    with pytest.raises(TypeError, match=r"not both and not neither"):
        type("Both", (OpTester,), {"not_applicable": {**ALL_BUT_BAD_INPUT, "bad_input": "why"}, "bad_inputs": _bad_inputs})
    with pytest.raises(TypeError, match=r"not_applicable names unknown checks \['smoke'\]"):
        type("Unknown", (OpTester,), {"not_applicable": {**ALL_BUT_BAD_INPUT, "smoke": "why"}, "bad_inputs": _bad_inputs})


def test_a_check_that_does_not_apply_is_not_collected() -> None:
    fed = type("Fed", (OpTester,), {"not_applicable": ALL_BUT_BAD_INPUT, "bad_inputs": _bad_inputs})
    assert callable(fed.test_bad_input_raises)
    for _, tests in (CHECKS[check] for check in ALL_BUT_BAD_INPUT):
        for name in tests:
            assert getattr(fed, name) is None, name  # pytest collects only callables
    assert callable(OpTester.test_gradcheck)  # the base class keeps every check


def test_every_op_states_why_each_missing_check_does_not_apply() -> None:
    for op in OPS:
        for check, reason in op.not_applicable.items():
            assert check in CHECKS and len(reason) > 10, (op.__name__, check)


def _cpu_device_cases() -> list[Any]:
    cases = []
    for op in OPS:
        if "cuda" in op.not_applicable:
            continue
        for case in op().device_cases():
            if "cuda" in case.id or case.dtype not in (None, torch.float32):
                continue  # needs a GPU to build, or a dtype the CPU kernels lack
            cases.append(pytest.param(op, case, id=f"{op.__name__}-{case.id}"))
    return cases


@pytest.mark.parametrize(("op", "case"), _cpu_device_cases())
def test_the_cuda_check_runs_with_the_cpu_as_device(op: type[OpTester], case: RunCase) -> None:
    op().check_device(case, "cpu")
