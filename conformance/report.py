"""Conformance reports: a backend x feature matrix in markdown, and everything in JSON."""

from __future__ import annotations

import datetime
import json
import platform
from collections import defaultdict

import torch

from .runner import CaseResult


def environment(device: str) -> dict:
    import attnhub

    env = {"date": datetime.date.today().isoformat(), "attnhub": attnhub.__version__,
           "torch": torch.__version__, "python": platform.python_version(), "device": device}
    if device.startswith("cuda") and torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name(torch.device(device))
    try:
        import importlib.metadata

        env["triton"] = importlib.metadata.version("triton")
    except Exception:
        env["triton"] = None
    return env


def _cell(results: list[CaseResult]) -> str:
    passed = sum(r.status == "pass" for r in results)
    failed = sum(r.failed for r in results)
    unsupported = sum(r.status == "unsupported" for r in results)
    fwd_only = sum(r.status == "pass" and r.forward_only for r in results)
    parts = []
    if failed:
        parts.append(f"**FAIL {failed}**")
    if passed:
        parts.append(f"pass {passed}" + (f" ({fwd_only} fwd only)" if fwd_only else ""))
    if unsupported:
        parts.append(f"unsupported {unsupported}")
    return ", ".join(parts) or "-"


def markdown(results: list[CaseResult], tier: str, device: str) -> str:
    env = environment(device)
    features: list[str] = []
    for r in results:
        if r.case.feature not in features:
            features.append(r.case.feature)
    by_cell: dict[tuple[str, str], list[CaseResult]] = defaultdict(list)
    backends: list[str] = []
    for r in results:
        by_cell[r.label, r.case.feature].append(r)
        if r.label not in backends:
            backends.append(r.label)
    lines = [f"# attnhub conformance: {tier} tier", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if v is not None), "",
             "Pass rule: max abs error against the reference in float64 <= 2 x the reference's "
             "own error in the case's dtype + 2 x the dtype's rounding error at the output's "
             "magnitude (at least 1e-5; lse: 1e-4); NaN never passes; inputs carry NaN padding and "
             "outputs are allocated from NaN-poisoned memory.", "",
             "| backend | " + " | ".join(features) + " | total |",
             "|---|" + "---|" * (len(features) + 1)]
    for b in backends:
        row = [_cell(by_cell[b, f]) for f in features]
        mine = [r for r in results if r.label == b]
        lines.append(f"| {b} | " + " | ".join(row) + f" | {_cell(mine)} |")
    failures = [r for r in results if r.failed]
    if failures:
        lines += ["", "## Failures", "", "| backend | case | output | error | tolerance | why |",
                  "|---|---|---|---|---|---|"]
        for r in failures:
            bad = [c for c in r.checks if not c.ok]
            if not bad:
                lines.append(f"| {r.label} | {r.case.id} | - | - | - | "
                             f"{'; '.join(r.reasons)} |")
            for c in bad:
                lines.append(f"| {r.label} | {r.case.id} | {c.output} | {c.error:.3e} | "
                             f"{c.tolerance:.3e} | {c.failure} |")
    unsupported: dict[tuple[str, str], int] = defaultdict(int)
    for r in results:
        if r.status == "unsupported":
            for reason in r.reasons:
                unsupported[r.label, reason] += 1
    if unsupported:
        lines += ["", "## Unsupported (the backends' own reasons)", "",
                  "| backend | reason | cases |", "|---|---|---|"]
        for (b, reason), n in sorted(unsupported.items()):
            lines.append(f"| {b} | {reason} | {n} |")
    worst: dict[tuple[str, str], float] = {}
    for r in results:
        for c in r.checks:
            if c.tolerance > 0 and c.ok:
                key = (r.label, c.output)
                worst[key] = max(worst.get(key, 0.0), c.error / c.tolerance)
    if worst:
        lines += ["", "## Largest error / tolerance among passing checks", "",
                  "| backend | output | ratio |", "|---|---|---|"]
        for (b, out), ratio in sorted(worst.items()):
            lines.append(f"| {b} | {out} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def as_json(results: list[CaseResult], tier: str, device: str) -> str:
    return json.dumps({"tier": tier, "environment": environment(device),
                       "results": [r.to_dict() for r in results]}, indent=1)
