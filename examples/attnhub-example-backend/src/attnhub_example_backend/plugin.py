"""The plugin module named by the ``attnhub`` entry point in pyproject.toml.

attnhub imports this module (through pluggy) and calls the hook once per process. Keep it
cheap to import: the backend module is imported inside the hook.
"""

from __future__ import annotations

from collections.abc import Callable

import attnhub


@attnhub.hookimpl
def attnhub_register_backends(register: Callable[[attnhub.Backend], None]) -> None:
    from .backend import ExampleSDPABackend

    register(ExampleSDPABackend())
