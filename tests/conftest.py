"""Shared fixtures: a clean attnhub environment per test, and fake backends in a fresh registry."""

from __future__ import annotations

import os
import types

import pytest
import torch

# Without a GPU the Triton kernels run in Triton's interpreter (set before triton is imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import attnhub
from attnhub import dispatch
from attnhub.backends.reference import kernel
from attnhub.backends.reference import plugin as reference_plugin
from attnhub.registry import Registry, reset_registry

ENV_VARS = ("ATTNHUB_BACKEND", "ATTNHUB_FALLBACK", "ATTNHUB_VALIDATE", "ATTNHUB_SELECTION")


@pytest.fixture(autouse=True)
def _clean_attnhub_env(monkeypatch, tmp_path_factory):
    """No override or policy leaks in from the caller's environment or from another test, and
    no user-tuned cost table from the caller's cache directory (an empty one is in force)."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("ATTNHUB_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "no-cache"))
    dispatch.clear_cache()
    yield
    dispatch.clear_cache()


class FakeBackend(attnhub.Backend):
    """Computes with the reference kernel and records what it was asked (see make_backend)."""

    device_types = frozenset({"cpu"})
    capabilities = attnhub.Capabilities(dtypes=frozenset({torch.float32, torch.float64}))

    def __init__(self, reasons=(), unavailable=(), raises=None):
        self.extra_reasons, self.unavailable, self.raises = list(reasons), list(unavailable), raises
        self.calls: list[str] = []
        self.why_not_calls = 0

    def unavailable_reasons(self):
        return self.unavailable

    def why_not(self, problem):
        self.why_not_calls += 1
        if self.raises is not None:
            raise self.raises
        return super().why_not(problem) + self.extra_reasons

    def forward(self, problem, inputs):
        self.calls.append("forward")
        return kernel.forward(problem, inputs)

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        self.calls.append("backward")
        return kernel.backward(problem, inputs, dout, dlse)


def make_backend(name, priority=0, *, dtypes=(torch.float32, torch.float64), device_types=("cpu",),
                 fallback=False, reasons=(), unavailable=(), raises=None, **caps) -> FakeBackend:
    """A FakeBackend subclass instance with these class attributes (capabilities from caps)."""
    cls = type(f"Fake_{name}", (FakeBackend,), {
        "name": name, "priority": priority, "device_types": frozenset(device_types),
        "fallback": fallback,
        "capabilities": attnhub.Capabilities(dtypes=frozenset(dtypes), **caps)})
    return cls(reasons, unavailable, raises)


def plugin_of(*backends, name="fake_plugin"):
    """A plugin module registering ``backends`` through the attnhub_register_backends hook."""
    module = types.ModuleType(name)

    @attnhub.hookimpl
    def attnhub_register_backends(register):
        for b in backends:
            register(b)

    module.attnhub_register_backends = attnhub_register_backends
    return module


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests: each starts and ends with dynamo's caches and counters reset."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def install():
    """install(*backends, reference=True) -> a fresh Registry, made the process-wide one;
    the default registry is restored afterwards."""

    def _install(*backends, reference=True):
        registry = Registry()
        if reference:
            registry.add_plugin(reference_plugin)
        if backends:
            registry.add_plugin(plugin_of(*backends))
        reset_registry(registry)
        return registry

    yield _install
    reset_registry()
