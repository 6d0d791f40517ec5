"""Standing the simulator in for torch_npu: in sys.modules, for tests and for the CLI.

``ATTNHUB_NPU_SIMULATOR=1`` (read when the registry loads the npu backend) installs the
simulator as ``torch_npu`` and lets the npu backend take CPU tensors, ranked below the
reference so that only calls that ask for ``backend="npu"`` reach it:

    ATTNHUB_NPU_SIMULATOR=1 attnhub conformance --backend npu

In Python, ``with simulated(): ...`` does the same for a block (and reloads the registry on
entry, restoring the previous registry on exit).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import ModuleType

ENV_VAR = "ATTNHUB_NPU_SIMULATOR"


def requested_by_env() -> bool:
    return os.environ.get(ENV_VAR, "") not in ("", "0")


def active() -> bool:
    """True when ``import torch_npu`` gives the simulator."""
    module = sys.modules.get("torch_npu")
    return module is not None and getattr(module, "SIMULATOR", False) is True


def install() -> ModuleType:
    """Put the simulator in sys.modules as ``torch_npu``; returns what was there (or None)."""
    from . import simulator

    previous = sys.modules.get("torch_npu")
    sys.modules["torch_npu"] = simulator
    return previous


@contextlib.contextmanager
def simulated() -> Iterator[ModuleType]:
    """Within the block ``torch_npu`` is the simulator and the registry is reloaded, so the
    npu backend takes CPU tensors; everything is restored afterwards."""
    from attnhub.registry import get_registry, reset_registry

    registry = get_registry()
    previous = install()
    reset_registry()
    try:
        yield sys.modules["torch_npu"]
    finally:
        if previous is None:
            sys.modules.pop("torch_npu", None)
        else:
            sys.modules["torch_npu"] = previous
        reset_registry(registry)
