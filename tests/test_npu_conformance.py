"""The npu adapter through the conformance suite's quick tier, with the simulator standing in
for torch_npu: every case passes or is declined with the backend's own reasons."""

from __future__ import annotations

import pytest
from attnhub.backends.npu.simulation import simulated
from attnhub.conformance.cases import quick_cases
from attnhub.conformance.runner import run_case

CASES = quick_cases()


@pytest.fixture(scope="module")
def npu_simulator():
    with simulated() as module:
        yield module


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_quick_case_on_simulated_npu(npu_simulator, case):
    result = run_case(case, "npu", "cpu")
    assert result.status in ("pass", "unsupported"), result.describe()
    if result.status == "pass":
        assert result.checks and all(check.ok for check in result.checks), result.describe()
    else:
        assert result.reasons, f"npu declined {case.id} without a reason"


def test_the_claimed_features_are_exercised(npu_simulator):
    """Every feature the adapter claims passes at least one case (none is all-declined)."""
    claimed = ("gqa", "lengths", "causal", "window", "dropout", "dtype-headdim")
    passed = {c.feature for c in CASES if c.feature in claimed
              and (c.feature != "dtype-headdim" or c.head_dim == 72)
              and run_case(c, "npu", "cpu").status == "pass"}
    assert passed == {"gqa", "lengths", "causal", "window", "dropout", "dtype-headdim"}
