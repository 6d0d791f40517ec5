"""Exceptions raised by attnhub; each message names the argument or backend at fault."""

from __future__ import annotations


class AttnhubError(Exception):
    """Base class of every attnhub error."""


class InvalidArgumentError(AttnhubError, ValueError):
    """An argument of an attention call has the wrong shape, dtype, device or value."""

    def __init__(self, argument: str, expected: str, got: object = None) -> None:
        self.argument = argument
        self.expected = expected
        self.got = got
        message = f"argument '{argument}': expected {expected}"
        if got is not None:
            message += f", got {got}"
        super().__init__(message)


class CapacityError(InvalidArgumentError, RuntimeError):
    """KV lengths (cu_seqlens_k, cache_seqlens plus appended tokens, max_seqlen_k) beyond what a
    block table or a KV cache can hold. An InvalidArgumentError (so a ValueError) like every
    argument error, and a RuntimeError: flash_attn 2.8 raises RuntimeError naming block_table
    for it (mha_fwd_kvcache's check), and code written against flash_attn catches that."""


class UnknownBackendError(AttnhubError, ValueError):
    """A backend name (argument, context manager or environment variable) is not registered."""

    def __init__(self, name: str, source: str, valid: list[str]) -> None:
        self.name = name
        self.valid = valid
        super().__init__(
            f"unknown attnhub backend {name!r} (from {source}); registered backends: "
            + ", ".join(valid)
        )


class BackendUnavailableError(AttnhubError, RuntimeError):
    """The forced backend, or every backend under ATTNHUB_FALLBACK=error, cannot run the call."""
