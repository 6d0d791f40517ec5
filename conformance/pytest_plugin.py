"""pytest plugin: `pytest --attnhub-backend NAME` adds the conformance suite for NAME
(`--attnhub-surface SURFACE` runs it through a drop-in surface).

Registered under the ``pytest11`` entry point, so any project with attnhub installed can
check its own backend with one command line; ``-k`` filters cases by id as usual.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("attnhub", "attnhub conformance suite")
    group.addoption("--attnhub-backend", action="append", default=[], metavar="NAME",
                    help="run the attnhub conformance suite on this registered backend "
                         "(repeatable)")
    group.addoption("--attnhub-tier", default="quick", choices=("quick", "full"),
                    help="conformance tier (default quick)")
    group.addoption("--attnhub-device", default=None,
                    help="device for the conformance suite (default: the best one here)")
    group.addoption("--attnhub-surface", default=None, metavar="SURFACE",
                    help="run the cases through this drop-in surface (flash_attn, paddle, "
                         "flashattention_plus) instead of attention_forward_varlen")


class ConformanceFailure(Exception):
    def __init__(self, result) -> None:
        super().__init__(result.describe())
        self.result = result


class ConformanceItem(pytest.Item):
    """One case on one backend."""

    def __init__(self, *, case, backend: str, device: str, surface: str | None = None,
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.case, self.backend, self.device, self.surface = case, backend, device, surface

    def runtest(self) -> None:
        from .runner import run_case

        result = run_case(self.case, self.backend, self.device, self.surface)
        if result.status == "unsupported":
            pytest.skip("; ".join(result.reasons))
        if result.failed:
            raise ConformanceFailure(result)

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, ConformanceFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style=style)

    def reportinfo(self):
        via = f" via {self.surface}" if self.surface else ""
        return self.path, None, f"attnhub conformance [{self.backend}{via}] {self.case.id}"


@pytest.hookimpl(tryfirst=True)  # before -k / -m deselection, which then applies to these too
def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config,
                                  items: list[pytest.Item]) -> None:
    backends = config.getoption("--attnhub-backend")
    if not backends:
        return
    from attnhub.errors import UnknownBackendError
    from attnhub.main_job import best_device
    from attnhub.registry import get_registry

    from .cases import tier_cases
    from .surfaces import SURFACES

    surface = config.getoption("--attnhub-surface")
    if surface is not None and surface not in SURFACES:
        raise pytest.UsageError(f"--attnhub-surface: unknown surface {surface!r} (known: "
                                f"{', '.join(sorted(SURFACES))})")
    registry = get_registry()
    for name in backends:
        if name not in registry.backends:
            raise pytest.UsageError(str(UnknownBackendError(name, "--attnhub-backend",
                                                            registry.names())))
    device = config.getoption("--attnhub-device") or str(best_device())
    for backend in backends:
        for case in tier_cases(config.getoption("--attnhub-tier")):
            label = f"{backend}-via-{surface}" if surface else backend
            items.append(ConformanceItem.from_parent(
                session, name=f"attnhub-conformance[{label}-{case.id}]", case=case,
                backend=backend, device=device, surface=surface))

