"""CI's conformance run: the quick tier on every backend that can run on the CPU here.

Each case passes, or is unsupported with the backend's own reasons; it never fails or errors.
"""

from __future__ import annotations

import pytest
from attnhub.conformance.cases import quick_cases
from attnhub.conformance.cli import default_backends
from attnhub.conformance.runner import run_case

BACKENDS = default_backends("cpu")
CASES = quick_cases()


def test_the_cpu_has_backends_to_check():
    assert "reference" in BACKENDS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_quick_case(backend, case):
    result = run_case(case, backend, "cpu")
    assert result.status in ("pass", "unsupported"), result.describe()
    assert not result.failed, result.describe()
    if result.status == "pass":
        assert result.checks and all(check.ok for check in result.checks), result.describe()
    else:
        assert result.reasons, f"{backend} declined {case.id} without a reason"
