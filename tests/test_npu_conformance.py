"""The npu adapter through the conformance suite's quick tier, with the simulator standing in
for torch_npu: every case passes except softcap (no Ascend operator has it) and paged K/V
with block sizes that npu_fused_infer_attention_score's documentation rules out, which are
declined with the backend's own reasons."""

from __future__ import annotations

import pytest

from attnhub.backends.npu.simulation import simulated
from attnhub.conformance.cases import quick_cases
from attnhub.conformance.runner import run_case
from attnhub.registry import get_registry

CASES = quick_cases()


@pytest.fixture(scope="module")
def npu_simulator():
    with simulated() as module:
        yield module


def documented_decline(case) -> str | None:
    """The reason text the quick tier may decline ``case`` with, or None: it must pass."""
    if case.softcap > 0:
        return "softcap"
    if case.sinks and not get_registry().backends["npu"].capabilities.sinks:
        return "attention sinks"  # until the adapter passes torch_npu's sink argument
    if case.page_size is not None:
        decode = max(case.seqlens_q) <= 1
        if case.page_size % (16 if decode else 128):
            return "block_size a multiple of"
    return None


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_quick_case_on_simulated_npu(npu_simulator, case):
    result = run_case(case, "npu", "cpu")
    expected = documented_decline(case)
    if expected is None:
        assert result.status == "pass", result.describe()
        assert result.checks and all(check.ok for check in result.checks), result.describe()
    else:
        assert result.status == "unsupported", result.describe()
        assert any(expected in r for r in result.reasons), result.reasons


def test_the_claimed_features_are_exercised(npu_simulator):
    """Every feature the adapter claims passes at least one case (none is all-declined)."""
    claimed = ("gqa", "lengths", "causal", "window", "dropout", "dtype-headdim", "alibi",
               "paged")
    passed: set[str] = set()
    for c in CASES:  # one passing case per feature is enough
        if c.feature in claimed and c.feature not in passed \
                and (c.feature != "dtype-headdim" or c.head_dim == 72) \
                and run_case(c, "npu", "cpu").status == "pass":
            passed.add(c.feature)
    assert passed == set(claimed)
