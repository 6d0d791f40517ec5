"""The pluggy hook through which every backend, built-in or third-party, is registered."""

from __future__ import annotations

from collections.abc import Callable

import pluggy

from .backend import Backend

PROJECT = "attnhub"
ENTRY_POINT_GROUP = "attnhub"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def attnhub_register_backends(register: Callable[[Backend], None]) -> None:
    """Call ``register(backend)`` once for each Backend instance this plugin provides.

    A plugin is a module (or object) with this function decorated by
    ``attnhub.hookimpl``, announced under the entry-point group ``attnhub``.
    Keep module import cheap: import kernel packages inside the backend's methods.
    """
