"""Registers the sdpa backend through attnhub's plugin hook, like any third party."""

from __future__ import annotations

from collections.abc import Callable

from attnhub.backend import Backend
from attnhub.hookspecs import hookimpl


@hookimpl
def attnhub_register_backends(register: Callable[[Backend], None]) -> None:
    from .backend import SdpaBackend

    register(SdpaBackend())
