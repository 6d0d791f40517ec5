"""Registers the CUDA adapters through attnhub's plugin hook, like any third party. Each
adapter imports its kernel package only when used, so registering costs no CUDA import."""

from __future__ import annotations

from collections.abc import Callable

from attnhub.backend import Backend
from attnhub.hookspecs import hookimpl


@hookimpl
def attnhub_register_backends(register: Callable[[Backend], None]) -> None:
    from .fa3 import FA3Backend
    from .fa4 import FA4Backend
    from .flash_attn2 import FlashAttn2Backend
    from .torch_flash import TorchFlashBackend

    for backend in (TorchFlashBackend(), FlashAttn2Backend(), FA3Backend(), FA4Backend()):
        register(backend)
