"""What `attnhub info` reports: versions, devices, backends with their verdicts, capabilities."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch

from . import cost_tables
from .errors import InvalidEnvironmentError
from .registry import get_registry

ENV_VARS = ("ATTNHUB_BACKEND", "ATTNHUB_FALLBACK", "ATTNHUB_VALIDATE", "ATTNHUB_SELECTION",
            "ATTNHUB_CACHE_DIR", "ATTNHUB_REFERENCE_CHUNK_MB", "ATTNHUB_TRITON_AUTOTUNE",
            "TRITON_INTERPRET")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def devices() -> list[str]:
    """One line per device this process can use."""
    found = [f"cpu ({torch.get_num_threads()} threads, {platform.machine()})"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            found.append(f"cuda:{i} {props.name} (sm_{props.major}{props.minor}, "
                         f"{props.total_memory / 2**30:.0f} GiB)")
    for name in ("npu", "xpu", "mps"):
        module = getattr(torch, name, None)
        try:
            if module is not None and module.is_available():
                count = module.device_count() if hasattr(module, "device_count") else 1
                found.extend(f"{name}:{i}" for i in range(count))
        except Exception:  # a half-installed device plugin must not break `info`
            continue
    return found


def selection() -> dict[str, Any]:
    """How automatic selection ranks backends here: the mode, and per device type of this
    machine the cost tables in force (shipped, user-tuned) with their paths."""
    try:
        mode = cost_tables.selection_mode()
    except InvalidEnvironmentError as exc:
        mode = f"invalid ({exc})"
    types = ["cpu"]
    if torch.cuda.is_available():
        types.append("cuda")
    per_device = {}
    for device_type in types:
        identity = cost_tables.device_identity(device_type)
        table = cost_tables.active(device_type)
        per_device[device_type] = {
            "device": identity.name,
            "tables": [] if table is None else [
                {"source": t.source, "path": t.path, "classes": len(t.classes)}
                for t in table.tables],
            "user_table": str(cost_tables.user_table_path(identity)),
        }
    return {"mode": mode, "cache_dir": str(cost_tables.cache_dir()), "devices": per_device}


def collect() -> dict[str, Any]:
    """Everything `attnhub info` prints, as plain data (also its --json output)."""
    from . import __version__

    registry = get_registry()
    backends = []
    for name in registry.names():
        b = registry.backends[name]
        reasons = registry.unavailable_reasons(b)
        backends.append({
            "name": name,
            "devices": sorted(b.device_types),
            "priority": b.priority,
            "available": not reasons,
            "reasons": reasons,
            "origin": registry.origins[name],
            "description": b.description,
            "capabilities": b.capabilities.summary(),
        })
    return {
        "versions": {
            "attnhub": __version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda (torch build)": torch.version.cuda,
            "triton": _version("triton"),
            "pluggy": _version("pluggy"),
            "flash-attn": _version("flash-attn"),
            "flash_attn_3": _version("flash_attn_3"),
            "flash-attn-4": _version("flash-attn-4"),
            "torch_npu": _version("torch-npu"),
        },
        "devices": devices(),
        "backends": backends,
        "plugin_failures": [{"plugin": f.plugin, "error": f.error}
                            for f in registry.failures],
        "selection": selection(),
        "environment": {k: os.environ.get(k) for k in ENV_VARS},
    }


def render(data: dict[str, Any]) -> str:
    """The human-readable report."""
    lines = ["attnhub info", "", "versions:"]
    for k, v in data["versions"].items():
        lines.append(f"  {k:<20} {v if v is not None else '-'}")
    lines += ["", "devices:"] + [f"  {d}" for d in data["devices"]]
    lines += ["", "backends (higher priority is tried first on its devices):"]
    for b in data["backends"]:
        state = "available" if b["available"] else "unavailable"
        lines.append(f"  {b['name']:<14} {state:<12} priority {b['priority']:<6} "
                     f"devices {','.join(b['devices'])}  [{b['origin']}]")
        if b["description"]:
            lines.append(f"  {'':<14} {b['description']}")
        lines.extend(f"  {'':<14} why not: {r}" for r in b["reasons"])
    if data["plugin_failures"]:
        lines += ["", "plugins that failed to load (their backends are missing):"]
        lines.extend(f"  {f['plugin']}: {f['error']}" for f in data["plugin_failures"])
    sel = data["selection"]
    lines += ["", f"selection: {sel['mode']} (fastest measured backend per problem class, "
                  "priority as tie-break and for classes never measured; docs/backends.md)"]
    for device_type, d in sel["devices"].items():
        if not d["tables"]:
            lines.append(f"  {device_type} ({d['device']}): no cost table (`attnhub tune "
                         f"--device {device_type}` writes {d['user_table']})")
        for t in d["tables"]:
            lines.append(f"  {device_type} ({d['device']}): {t['source']} table {t['path']} "
                         f"({t['classes']} classes)")
    if data["backends"]:
        lines += ["", "capabilities:"]
        keys = list(data["backends"][0]["capabilities"])
        widths = {k: max(len(k), *(len(b["capabilities"][k]) for b in data["backends"]))
                  for k in keys}
        name_w = max(len("backend"), *(len(b["name"]) for b in data["backends"]))
        lines.append(("  " + "backend".ljust(name_w) + "  "
                      + "  ".join(k.ljust(widths[k]) for k in keys)).rstrip())
        for b in data["backends"]:
            lines.append(("  " + b["name"].ljust(name_w) + "  "
                          + "  ".join(b["capabilities"][k].ljust(widths[k]) for k in keys)
                          ).rstrip())
    lines += ["", "environment:"]
    for k, v in data["environment"].items():
        lines.append(f"  {k:<28} {v if v is not None else '(unset)'}")
    return "\n".join(lines)
