"""CI's conformance run: the quick tier on every backend that can run on the CPU here.

Each case passes, or is unsupported with the backend's own reasons; it never fails or errors.

Backends that run in Triton's interpreter (seconds per case) check, in the default run, the
cheapest case of every (feature, dtype) of the tier and every head dim of the head-dim
feature, so every feature keeps its coverage in CI; their other cases are marked ``slow``
(``TRITON_INTERPRET=1 python -m pytest -m slow tests/test_conformance_quick.py`` runs them;
on a GPU the full tier runs them natively, docs/conformance/).
"""

from __future__ import annotations

import pytest

from attnhub.conformance.cases import Case, quick_cases
from attnhub.conformance.cli import default_backends
from attnhub.conformance.runner import run_case

BACKENDS = default_backends("cpu")
CASES = quick_cases()
INTERPRETED = {"triton"}


def _cost(case: Case) -> int:
    return sum(a * b for a, b in zip(case.seqlens_q, case.seqlens_k, strict=True))


def interpreter_subset(cases: list[Case]) -> set[str]:
    """The ids of the cheapest case of each (feature, dtype), and of each head dim of the
    head-dim feature (the kernels' padded head-dim paths) in its first dtype."""
    best: dict[tuple, Case] = {}
    for case in cases:
        head_dims = case.feature == "dtype-headdim" and case.dtype == cases[0].dtype
        key = (case.feature, case.dtype, case.head_dim if head_dims else None)
        if key not in best or _cost(case) < _cost(best[key]):
            best[key] = case
    return {case.id for case in best.values()}


SUBSET = interpreter_subset(CASES)


def _params():
    for backend in BACKENDS:
        for case in CASES:
            slow = backend in INTERPRETED and case.id not in SUBSET
            yield pytest.param(backend, case, id=f"{case.id}-{backend}",
                               marks=[pytest.mark.slow] if slow else [])


def test_the_cpu_has_backends_to_check():
    assert "reference" in BACKENDS


def test_the_interpreter_subset_covers_every_feature():
    assert {c.feature for c in CASES if c.id in SUBSET} == {c.feature for c in CASES}


@pytest.mark.parametrize(("backend", "case"), list(_params()))
def test_quick_case(backend, case):
    result = run_case(case, backend, "cpu")
    assert result.status in ("pass", "unsupported"), result.describe()
    assert not result.failed, result.describe()
    if result.status == "pass":
        assert result.checks and all(check.ok for check in result.checks), result.describe()
    else:
        assert result.reasons, f"{backend} declined {case.id} without a reason"
