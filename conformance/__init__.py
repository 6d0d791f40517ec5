"""The conformance suite: every backend against the reference in float64.

    from attnhub.conformance import tier_cases, run_case, run_suite
    results = run_suite(tier_cases("quick"), ["my-backend"], "cpu")

From the command line: ``attnhub conformance --backend NAME --tier quick``; from pytest:
``pytest --attnhub-backend NAME`` (plugin registered under the ``pytest11`` entry point).
"""

from .cases import Case, full_tier_cases, quick_cases, tier_cases
from .runner import CaseResult, run_case, run_suite
from .tolerance import Check

__all__ = ["Case", "CaseResult", "Check", "full_tier_cases", "quick_cases", "run_case",
           "run_suite", "tier_cases"]
