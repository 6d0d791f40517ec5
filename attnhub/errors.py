"""Exceptions raised by attnhub; each message names the argument or backend at fault.

The classes keep their constructor arguments in ``args`` and build the message in
``__str__``, with no ``__init__`` of their own: torch.compile (dynamo) can then build and
catch them while tracing, which attnhub.deferred_errors relies on to show the same error,
with the same type, in compiled code (fullgraph included).
"""

from __future__ import annotations


class AttnhubError(Exception):
    """Base class of every attnhub error."""

    def _arg(self, i: int, default: object = None) -> object:
        return self.args[i] if len(self.args) > i else default


class InvalidArgumentError(AttnhubError, ValueError):
    """An argument of an attention call has the wrong shape, dtype, device or value.

    ``InvalidArgumentError(argument, expected, got=None)``."""

    kind = "argument"

    @property
    def argument(self) -> str:
        return self._arg(0)  # type: ignore[return-value]

    @property
    def expected(self) -> str:
        return self._arg(1, "")  # type: ignore[return-value]

    @property
    def got(self) -> object:
        return self._arg(2)

    def __str__(self) -> str:
        message = f"{self.kind} '{self.argument}': expected {self.expected}"
        if self.got is not None:
            message += f", got {self.got}"
        return message


class InvalidEnvironmentError(InvalidArgumentError):
    """An attnhub environment variable has a value attnhub does not understand.

    ``InvalidEnvironmentError(variable, expected, got)``."""

    kind = "environment variable"


class CapacityError(InvalidArgumentError, RuntimeError):
    """KV lengths (cu_seqlens_k, cache_seqlens plus appended tokens, max_seqlen_k) beyond what a
    block table or a KV cache can hold. An InvalidArgumentError (so a ValueError) like every
    argument error, and a RuntimeError: flash_attn 2.8 raises RuntimeError naming block_table
    for it (mha_fwd_kvcache's check), and code written against flash_attn catches that."""


class UnknownBackendError(AttnhubError, ValueError):
    """A backend name (argument, context manager or environment variable) is not registered.

    ``UnknownBackendError(name, source, valid_names)``."""

    @property
    def name(self) -> str:
        return self._arg(0)  # type: ignore[return-value]

    @property
    def valid(self) -> list[str]:
        valid = self._arg(2, [])
        return valid.split(", ") if isinstance(valid, str) else list(valid)  # type: ignore

    def __str__(self) -> str:
        return (f"unknown attnhub backend {self.name!r} (from {self._arg(1)}); registered "
                "backends: " + ", ".join(self.valid))


class BackendUnavailableError(AttnhubError, RuntimeError):
    """The forced backend, or every backend under ATTNHUB_FALLBACK=error, cannot run the call."""

    def __str__(self) -> str:
        return str(self._arg(0, ""))


class BackendResultError(AttnhubError, RuntimeError):
    """A backend returned a tensor that breaks its contract (shape, dtype or device).

    ``BackendResultError(backend, what, expected, got)``."""

    @property
    def backend(self) -> str:
        return self._arg(0)  # type: ignore[return-value]

    @property
    def what(self) -> str:
        return self._arg(1)  # type: ignore[return-value]

    def __str__(self) -> str:
        return (f"backend {self.backend!r} returned {self.what} with {self._arg(3)}; expected "
                f"{self._arg(2)} (a bug in that backend: report it to its authors, or pass "
                "another backend=)")


def error_class(name: str) -> type[AttnhubError]:
    """The attnhub error class called ``name`` (errors rebuilt from their name and args, as
    torch.compile tracing needs: attnhub.dispatch, attnhub.deferred_errors)."""
    classes = {cls.__name__: cls for cls in (
        InvalidArgumentError, InvalidEnvironmentError, CapacityError, UnknownBackendError,
        BackendUnavailableError, BackendResultError)}
    return classes.get(name, BackendUnavailableError)
