"""Facts about the CUDA device and installed packages, read once per process, without
importing any CUDA-only extension."""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
from collections.abc import Callable
from types import ModuleType

import torch


@functools.cache
def capability() -> tuple[int, int] | None:
    """Compute capability (major, minor) of the current CUDA device, None without one."""
    if torch.version.cuda is None or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability()


def cuda_reasons(supported: str, ok: bool | None = None) -> list[str]:
    """Reasons this process cannot run a CUDA kernel: no CUDA build or device, or (when ``ok``
    is False for the device's capability) a GPU generation outside ``supported``."""
    if torch.version.cuda is None:
        return ["this PyTorch build has no CUDA (torch.version.cuda is None)"]
    cc = capability()
    if cc is None:
        return ["no CUDA device (torch.cuda.is_available() is False)"]
    if ok is False:
        return [f"needs {supported}, found compute capability {cc[0]}.{cc[1]}"]
    return []


def distribution_version(name: str) -> str | None:
    """Installed version of distribution ``name`` (no import), None when absent."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def module_present(name: str) -> bool:
    """Whether top-level module ``name`` can be found (no import)."""
    return importlib.util.find_spec(name) is not None


def import_reason(module: str) -> list[str]:
    """Import ``module``; a failure is a reason (a broken or mismatched build)."""
    try:
        importlib.import_module(module)
    except Exception as exc:
        return [f"importing {module} failed: {type(exc).__name__}: {exc}"]
    return []


def lazy_module(name: str) -> Callable[[], ModuleType]:
    """A function that imports module ``name`` on its first call and returns it: adapters
    import their kernel package only when a call runs on them."""
    @functools.cache
    def load() -> ModuleType:
        return importlib.import_module(name)
    return load
