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
    claimed = ("gqa", "lengths", "causal", "window", "dropout", "dtype-headdim", "alibi")
    passed: set[str] = set()
    for c in CASES:  # one passing case per feature is enough
        if c.feature in claimed and c.feature not in passed \
                and (c.feature != "dtype-headdim" or c.head_dim == 72) \
                and run_case(c, "npu", "cpu").status == "pass":
            passed.add(c.feature)
    assert passed == set(claimed)


def test_alibi_cases_run_where_sq_equals_sk_and_are_declined_with_the_constraint_elsewhere(
        npu_simulator):
    for case in (c for c in CASES if c.alibi is not None):
        result = run_case(case, "npu", "cpu")
        if case.seqlens_q == case.seqlens_k:
            assert result.status == "pass", result.describe()
        else:
            assert result.status == "unsupported"
            assert any("Sq and Skv are of equal length" in r for r in result.reasons)
