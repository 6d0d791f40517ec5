"""`attnhub conformance`: run a tier on backends, print a progress bar, write both reports."""

from __future__ import annotations

import pathlib
import sys

from attnhub import dispatch
from attnhub.errors import UnknownBackendError
from attnhub.main_job import best_device
from attnhub.registry import get_registry

from . import report
from .cases import tier_cases
from .runner import CaseResult, run_suite


def default_backends(device_type: str) -> list[str]:
    """Every registered backend that claims the device type and is available here."""
    registry = get_registry()
    return [b.name for b in registry.for_device(device_type)
            if not registry.unavailable_reasons(b)]


def _progress(done: int, total: int, result: CaseResult) -> None:
    """A bar redrawn in place on a terminal; a line per tenth of the run elsewhere (CI logs)."""
    if not sys.stderr.isatty():
        if done == total or done % max(1, total // 10) == 0:
            sys.stderr.write(f"attnhub conformance: {done}/{total}\n")
        return
    width = 30
    filled = width * done // total
    mark = {"pass": ".", "fail": "F", "error": "E", "unsupported": "s"}[result.status]
    sys.stderr.write(f"\r[{'#' * filled}{'-' * (width - filled)}] {done}/{total} {mark} "
                     f"{result.backend:<12.12} {result.case.id[:60]:<60}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def run_conformance(backends: list[str] | None, device: str | None, tier: str,
                    report_path: str, json_path: str,
                    keyword: str | list[str] | None = None,
                    features: list[str] | None = None, surface: str | None = None) -> int:
    """Returns the exit status: 0 when every backend checked some case and none failed; 1
    when a case failed or a backend checked nothing (every case unsupported); 2 on bad
    arguments, or when no case matches the selection."""
    dev = device or str(best_device())
    registry = get_registry()
    names = backends or default_backends(dev.split(":")[0])
    for name in names:
        if name not in registry.backends:
            error = UnknownBackendError(name, "--backend", registry.names())
            print(f"attnhub conformance: {error}", file=sys.stderr)
            return 2
    keywords = [keyword] if isinstance(keyword, str) else keyword or []
    known = sorted({c.feature for c in tier_cases(tier)})
    unknown = sorted(set(features or ()) - set(known))
    if unknown:
        print(f"attnhub conformance: unknown --feature {', '.join(unknown)}; the {tier} tier "
              f"has: {', '.join(known)}", file=sys.stderr)
        return 2
    cases = [c for c in tier_cases(tier)
             if (not keywords or any(k in c.id for k in keywords))
             and (not features or c.feature in features)]
    if not cases:
        print(f"attnhub conformance: no case of the {tier} tier matches "
              + " and ".join(filter(None, (keywords and f"-k {' / '.join(keywords)}",
                                           features and f"--feature {', '.join(features)}")))
              + f"; nothing was checked (features here: {', '.join(known)})", file=sys.stderr)
        return 2
    with dispatch.use_backend(None):
        results = run_suite(cases, names, dev, progress=_progress, surface=surface)
    pathlib.Path(report_path).write_text(report.markdown(results, tier, dev))
    pathlib.Path(json_path).write_text(report.as_json(results, tier, dev))
    failed = [r for r in results if r.failed]
    counts = {s: sum(r.status == s for r in results) for s in ("pass", "fail", "error",
                                                                 "unsupported")}
    for r in failed:
        print(r.describe())
    via = f" via {surface}" if surface else ""
    print(f"attnhub conformance ({tier}, {dev}, {', '.join(names)}{via}): {counts['pass']} passed, "
          f"{counts['fail'] + counts['error']} failed, {counts['unsupported']} unsupported; "
          f"reports: {report_path}, {json_path}")
    idle = [n for n in names if not any(r.backend == n and r.status != "unsupported"
                                        for r in results)]
    for name in idle:
        reasons = sorted({reason for r in results if r.backend == name for reason in r.reasons})
        reasons += registry.unavailable_reasons(registry.backends[name])  # (hints, e.g. triton)
        print(f"attnhub conformance: backend {name!r} checked nothing on {dev}: every selected "
              f"case is unsupported there. Its reasons:\n  - " + "\n  - ".join(reasons[:6]),
              file=sys.stderr)
    return 1 if failed or idle else 0
