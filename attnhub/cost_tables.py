"""Measured cost tables: per device, per problem class, each backend's time in milliseconds.

Two sources, merged per class (a user-tuned entry replaces the shipped entry of its class):

* shipped: ``attnhub/data/selection/*.json`` in the package, each with a ``match`` block
  (device type, compute capability, a regular expression searched in the device name) so one
  table serves a GPU family (e.g. H100 / H200);
* user-tuned: ``selection-<type>-<device name>.json`` in the cache directory
  (``$ATTNHUB_CACHE_DIR``, else ``$XDG_CACHE_HOME/attnhub``, else ``~/.cache/attnhub``),
  written by ``attnhub tune`` for the device it ran on.

``ATTNHUB_SELECTION=priority`` ignores both (selection by priority only, for debugging).
A table that cannot be read is reported once (RuntimeWarning) and ignored: a broken cache file
never breaks an attention call. The file format (``FORMAT``)::

    {"format": "attnhub-cost-table/1", "unit": "ms",
     "device": {"type": "cuda", "name": "NVIDIA H200", "capability": "9.0"},
     "match": {"type": "cuda", "capability": "9.0", "name_pattern": "H100|H200"},  # shipped
     "classes": {"bfloat16/d128/g2-8/causal/short/fwd+bwd": {"triton": 2.3, "torch-flash": 1.86}},
     ...}  # more keys (versions, shapes, settings) are informational
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import platform
import re
import threading
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources

import torch

from . import environment
from .errors import InvalidEnvironmentError
from .problem_class import ProblemClass

FORMAT = "attnhub-cost-table/1"
MODES = ("measured", "priority")
TIE_TOLERANCE = 0.03  # backends within 3% of the fastest are tied: priority decides
# A dtype whose class was never measured uses its twin's entry (the flash kernels run the
# same code for both half-precision types).
DTYPE_TWINS = {"float16": "bfloat16", "bfloat16": "float16"}
# A length bucket whose class was never measured uses this one's entry (a tiny call with host
# lengths costs what one with device offsets does, up to the host path's difference).
LENGTH_TWINS = {"tiny-host": "tiny"}

_lock = threading.Lock()
_active: dict[str, ActiveTable | None] = {}


@dataclass(frozen=True)
class DeviceIdentity:
    """The device a table is for: type (``cuda``, ``cpu``, ...), name as the driver reports
    it, and compute capability (``"9.0"``; None where there is none)."""

    type: str
    name: str
    capability: str | None = None

    def as_dict(self) -> dict:
        return {"type": self.type, "name": self.name, "capability": self.capability}


@dataclass
class CostTable:
    """One table file: its device, optional match block, and class key -> {backend: ms}."""

    device: dict
    classes: dict[str, dict[str, float]]
    match: dict | None = None
    source: str = "user-tuned"  # or "shipped"
    path: str = ""
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_json(cls, data: object, source: str, path: str) -> CostTable:
        """Validate a parsed table; ValueError naming the file and the field at fault."""
        def fail(what: str) -> ValueError:
            return ValueError(f"cost table {path}: {what}")

        if not isinstance(data, dict):
            raise fail("expected a JSON object")
        if data.get("format") != FORMAT:
            raise fail(f"format {data.get('format')!r}, expected {FORMAT!r}")
        device = data.get("device")
        if not isinstance(device, dict) or not isinstance(device.get("type"), str) \
                or not isinstance(device.get("name"), str):
            raise fail("'device' must be an object with string 'type' and 'name'")
        match = data.get("match")
        if match is not None:
            if not isinstance(match, dict) or not isinstance(match.get("type"), str):
                raise fail("'match' must be an object with a string 'type'")
            try:
                re.compile(match.get("name_pattern") or "")
            except re.error as exc:
                raise fail(f"'match.name_pattern' is not a regular expression: {exc}") from None
        classes = data.get("classes")
        if not isinstance(classes, dict):
            raise fail("'classes' must be an object of class key -> {backend: ms}")
        for key, costs in classes.items():
            try:
                ProblemClass.parse(key)
            except ValueError as exc:
                raise fail(str(exc)) from None
            if not isinstance(costs, dict) or not all(
                    isinstance(b, str) and type(ms) in (int, float) and ms > 0 and math.isfinite(ms)
                    for b, ms in costs.items()):
                raise fail(f"class {key!r}: expected {{backend name: milliseconds > 0}}")
        extra = {k: v for k, v in data.items() if k not in ("device", "match", "classes")}
        return cls(dict(device), {k: dict(v) for k, v in classes.items()}, match, source, path,
                   extra)

    def to_json(self) -> dict:
        data = {"format": FORMAT, "unit": "ms", **self.extra, "device": self.device}
        data["format"] = FORMAT
        if self.match is not None:
            data["match"] = self.match
        data["classes"] = {k: self.classes[k] for k in sorted(self.classes)}
        return data

    def matches(self, identity: DeviceIdentity) -> bool:
        """Whether this table is for ``identity``: a user-tuned table names that exact device;
        a shipped one matches by type, capability (when given) and name pattern."""
        if self.match is None:
            return (self.device.get("type") == identity.type
                    and self.device.get("name") == identity.name)
        if self.match.get("type") != identity.type:
            return False
        capability = self.match.get("capability")
        if capability is not None and str(capability) != identity.capability:
            return False
        pattern = self.match.get("name_pattern")
        return not pattern or re.search(pattern, identity.name, re.IGNORECASE) is not None


@dataclass
class ActiveTable:
    """The merged classes in force for one device type, and the tables they came from."""

    identity: DeviceIdentity
    classes: dict[str, dict[str, float]]
    tables: list[CostTable]

    def costs(self, cls: ProblemClass) -> dict[str, float] | None:
        """{backend: ms} for ``cls``: its own entry, else its dtype twin's, else (tiny-host)
        its length twin's the same way. None: never measured."""
        for length in (cls.length, LENGTH_TWINS.get(cls.length)):
            if length is None:
                continue
            twin = cls._replace(length=length)
            found = self.classes.get(twin.key())
            if found is None and cls.dtype in DTYPE_TWINS:
                found = self.classes.get(twin._replace(dtype=DTYPE_TWINS[cls.dtype]).key())
            if found is not None:
                return found
        return None

    def describe(self) -> list[str]:
        return [f"{t.source} {t.path} ({len(t.classes)} classes)" for t in self.tables]


def selection_mode() -> str:
    """``ATTNHUB_SELECTION``: ``measured`` (default: cost tables, priority as tie-break and for
    classes never measured) or ``priority`` (tables ignored)."""
    mode = environment.get("ATTNHUB_SELECTION") or "measured"
    if mode not in MODES:
        raise InvalidEnvironmentError("ATTNHUB_SELECTION", "one of measured, priority",
                                      repr(mode))
    return mode


def choose(contenders: Sequence[tuple[str, int]], costs: Mapping[str, float],
           tolerance: float = TIE_TOLERANCE) -> str | None:
    """The backend to run among ``contenders`` ((name, priority), highest priority first, all
    able to run the call), given measured ``costs`` (ms): the fastest, where every backend
    within ``tolerance`` of it counts as tied and the highest priority among the tied wins; a
    contender with no figure keeps its priority place (it wins when ranked above that
    choice). None when no contender was measured."""
    measured = [name for name, _ in contenders if name in costs]
    if not measured:
        return None
    best = min(costs[name] for name in measured)
    winner = next(name for name in measured if costs[name] <= best * (1 + tolerance))
    for name, _ in contenders:
        if name == winner or name not in costs:
            return name
    return winner  # (unreachable: the winner is a contender)


def cache_dir() -> pathlib.Path:
    """Where ``attnhub tune`` writes and selection reads user-tuned tables."""
    explicit = os.environ.get("ATTNHUB_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = pathlib.Path(xdg).expanduser() if xdg else pathlib.Path.home() / ".cache"
    return base / "attnhub"


def user_table_path(identity: DeviceIdentity) -> pathlib.Path:
    slug = re.sub(r"[^a-z0-9]+", "-", identity.name.lower()).strip("-") or "device"
    return cache_dir() / f"selection-{identity.type}-{slug}.json"


def device_identity(device_type: str) -> DeviceIdentity:
    """The identity of this process's current device of ``device_type``."""
    if device_type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device()
        major, minor = torch.cuda.get_device_capability(index)
        return DeviceIdentity("cuda", torch.cuda.get_device_name(index), f"{major}.{minor}")
    if device_type == "cpu":
        return DeviceIdentity("cpu", _cpu_name())
    module = getattr(torch, device_type, None)
    get_name = getattr(module, "get_device_name", None)
    try:
        name = get_name() if get_name is not None else device_type
    except Exception:  # a device plugin without a usable name
        name = device_type
    return DeviceIdentity(device_type, str(name))


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def shipped_tables() -> list[CostTable]:
    """Every table shipped in the package (attnhub/data/selection/*.json), by file name."""
    folder = resources.files("attnhub") / "data" / "selection"
    if not folder.is_dir():
        return []
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            table = _read(entry.read_text(encoding="utf-8"), "shipped", str(entry))
            if table is not None:
                found.append(table)
    return found


def read_table(path: str | os.PathLike, source: str = "user-tuned") -> CostTable:
    """Parse and validate one table file (OSError / ValueError on failure)."""
    text = pathlib.Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"cost table {path}: not JSON ({exc})") from None
    return CostTable.from_json(data, source, str(path))


def write_table(table: CostTable, path: str | os.PathLike) -> None:
    """Write ``table`` atomically (a reader never sees half a file), creating folders."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _read(text: str, source: str, path: str) -> CostTable | None:
    try:
        return CostTable.from_json(json.loads(text), source, path)
    except (ValueError, json.JSONDecodeError) as exc:
        warnings.warn(f"attnhub: ignoring {source} cost table {path}: {exc}", RuntimeWarning,
                      stacklevel=2)
        return None


def active(device_type: str) -> ActiveTable | None:
    """The merged table for this process's ``device_type`` device, loaded once (``clear``
    forgets it); None when no table applies."""
    if device_type in _active:
        return _active[device_type]
    with _lock:
        if device_type not in _active:
            _active[device_type] = _load(device_type)
    return _active[device_type]


def _load(device_type: str) -> ActiveTable | None:
    identity = device_identity(device_type)
    tables = [t for t in shipped_tables() if t.matches(identity)][:1]
    path = user_table_path(identity)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            warnings.warn(f"attnhub: cannot read user-tuned cost table {path}: {exc}",
                          RuntimeWarning, stacklevel=2)
        else:
            user = _read(text, "user-tuned", str(path))
            if user is not None and user.matches(identity):
                tables.append(user)
    if not tables:
        return None
    merged: dict[str, dict[str, float]] = {}
    for table in tables:  # shipped first: a user-tuned class replaces it
        merged.update(table.classes)
    return ActiveTable(identity, merged, tables)


def clear() -> None:
    """Forget the loaded tables (after ``attnhub tune`` or a cache directory change)."""
    with _lock:
        _active.clear()
