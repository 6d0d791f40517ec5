"""Backend registry: plugin discovery through pluggy (built-ins and entry points), once."""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import pluggy

from . import hookspecs
from .backend import Backend

BUILTIN_PLUGINS = ("attnhub.backends.reference.plugin", "attnhub.backends.triton.plugin",
                   "attnhub.backends.cuda.plugin", "attnhub.backends.npu.plugin",
                   "attnhub.backends.sdpa.plugin")


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose registration failed."""

    plugin: str
    error: str


class Registry:
    """Every registered backend by name, the plugins that failed, and availability."""

    def __init__(self) -> None:
        self.backends: dict[str, Backend] = {}
        self.origins: dict[str, str] = {}
        self.failures: list[PluginFailure] = []
        self._unavailable: dict[str, list[str]] = {}
        self.plugin_manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.plugin_manager.add_hookspecs(hookspecs)

    def load(self, builtins: tuple[str, ...] = BUILTIN_PLUGINS, entry_points: bool = True) -> None:
        """Register the built-in plugin modules, then every entry point of group 'attnhub'.
        An entry point naming a built-in module is the same plugin and is skipped."""
        for module_name in builtins:
            self._add(module_name, lambda m=module_name: importlib.import_module(m))
        if entry_points:
            for ep in importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP):
                if ep.value in builtins:
                    continue
                self._add(f"{ep.name} ({ep.value})", ep.load)

    def add_plugin(self, plugin: object, name: str | None = None) -> None:
        """Register an already imported plugin object (tests, interactive use)."""
        self._add(name or getattr(plugin, "__name__", repr(plugin)), lambda: plugin)

    def _add(self, label: str, load) -> None:
        try:
            plugin = load()
            self.plugin_manager.register(plugin, name=label)
        except Exception as exc:  # a broken plugin must not break the others
            self._fail(label, f"failed to load: {type(exc).__name__}: {exc}")
            return
        hook = self.plugin_manager.hook.attnhub_register_backends
        for impl in hook.get_hookimpls():
            if impl.plugin is not plugin:
                continue
            try:
                impl.function(register=lambda b, label=label: self._register(b, label))
            except Exception as exc:
                self._fail(label, f"attnhub_register_backends raised {type(exc).__name__}: {exc}")

    def _register(self, backend: Backend, origin: str) -> None:
        if not isinstance(backend, Backend):
            raise TypeError(f"register() takes an attnhub.Backend instance, got "
                            f"{type(backend).__name__}")
        name = getattr(backend, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(backend).__name__} has no name")
        if name in self.backends:
            raise ValueError(f"backend name {name!r} is already registered by "
                             f"{self.origins[name]}")
        self.backends[name] = backend
        self.origins[name] = origin

    def _fail(self, label: str, error: str) -> None:
        self.failures.append(PluginFailure(label, error))
        warnings.warn(f"attnhub plugin {label} {error}; its backends are not available "
                      "(see `attnhub info`)", RuntimeWarning, stacklevel=4)

    def unavailable_reasons(self, backend: Backend) -> list[str]:
        """Backend.unavailable_reasons(), computed once; an exception there is a reason too."""
        reasons = self._unavailable.get(backend.name)
        if reasons is None:
            try:
                reasons = list(backend.unavailable_reasons())
            except Exception as exc:
                reasons = [f"availability check raised {type(exc).__name__}: {exc}"]
            self._unavailable[backend.name] = reasons
        return reasons

    def names(self) -> list[str]:
        return sorted(self.backends)

    def for_device(self, device_type: str) -> list[Backend]:
        """Backends that claim ``device_type``, highest priority first."""
        found = [b for b in self.backends.values()
                 if device_type in b.device_types or "*" in b.device_types]
        return sorted(found, key=lambda b: (-b.priority, b.name))


_registry: Registry | None = None
_lock = threading.Lock()
# Called after reset_registry() swaps the process-wide registry: modules that cache what they
# derived from it (dispatch's selections) register here, so the registry imports none of them.
_reset_listeners: list[Callable[[], None]] = []


def on_reset(listener: Callable[[], None]) -> None:
    """Call ``listener()`` (no arguments) after every reset_registry()."""
    if listener not in _reset_listeners:
        _reset_listeners.append(listener)


def get_registry() -> Registry:
    """The process-wide registry, loaded on first use."""
    global _registry
    if _registry is None:
        with _lock:
            if _registry is None:
                registry = Registry()
                registry.load()
                _registry = registry
    return _registry


def reset_registry(registry: Registry | None = None) -> Registry:
    """Replace the process-wide registry (a fresh load by default), then tell the on_reset
    listeners (dispatch clears its cached selections)."""
    global _registry
    with _lock:
        if registry is None:
            registry = Registry()
            registry.load()
        _registry = registry
    for listener in tuple(_reset_listeners):
        listener()
    return registry
