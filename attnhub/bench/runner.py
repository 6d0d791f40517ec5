"""Run the matrix: every implementation on every cell, forward and forward+backward.

Implementations: each attnhub backend forced by name (``backend=NAME``), attnhub's
automatic choice (``auto``), and the external kernels called directly (``NAME (direct)``,
attnhub.bench.direct). A backend that cannot run a cell contributes its reasons instead of a
time; an exception in one measurement is recorded and the run goes on.
"""

from __future__ import annotations

import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch

from ..dispatch import explain_problem
from ..normalize import normalize
from ..registry import get_registry
from ..timing import device_time_ms, host_time_us, synchronize
from .direct import DirectKernel, direct_kernels_for
from .inputs import CellInputs, attnhub_call_args, attnhub_runner, make_inputs
from .matrix import Cell

AUTO = "auto"


@dataclass
class Measurement:
    """One implementation on one cell and mode.

    ``status``: ``ok`` (``ms`` device time per call, or ``host_us`` for tiny cells, and
    ``tflops``), ``n/a`` (``reason``: why it cannot run the cell), ``error`` (``reason``:
    the exception) or ``skipped`` (the run's time limit came first). ``selected``: the
    backend attnhub's automatic choice ran (``auto`` only).
    """

    cell: str
    impl: str
    mode: str
    status: str
    ms: float | None = None
    host_us: float | None = None
    tflops: float | None = None
    reason: str = ""
    selected: str | None = None


@dataclass
class BenchConfig:
    """What to run. ``backends``: attnhub backend names (None: every backend available for
    the device, the fallback reference left out on accelerators), ``auto``: also measure the
    automatic choice, ``direct``: also call the wrapped kernels directly. ``warmup_ms`` /
    ``rep_ms``: device_time_ms's budget per measurement, split over ``rounds`` interleaved
    rounds; ``host_calls`` / ``host_rounds``: host_time_us's loop for tiny cells (its rounds
    split the same way)."""

    device: torch.device
    backends: list[str] | None = None
    auto: bool = True
    direct: bool = True
    offsets: str = "varlen-info"
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    host_calls: int = 200
    host_rounds: int = 5
    rounds: int = 3
    deadline: float | None = None  # time.monotonic() after which no cell is started
    left_out: dict[str, str] = field(default_factory=dict)


def default_backends(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """(backends to measure, {backend left out: why}) for ``device``: every registered
    backend of its type that is available here, highest priority first; on an accelerator
    the fallback (the reference) is left out, being the oracle rather than a contender."""
    registry = get_registry()
    chosen, left_out = [], {}
    for backend in registry.for_device(device.type):
        reasons = registry.unavailable_reasons(backend)
        if reasons:
            left_out[backend.name] = "; ".join(reasons)
        elif backend.fallback and device.type != "cpu":
            left_out[backend.name] = ("the fallback, left out on accelerators (name it in "
                                      "--backends to measure it)")
        else:
            chosen.append(backend.name)
    return chosen, left_out


@dataclass
class _Impl:
    label: str
    backend: str | None  # the attnhub backend whose verdict applies (None: auto)
    build: Callable[[CellInputs, bool], Callable[[], object]]
    direct: DirectKernel | None = None


def _impls(cfg: BenchConfig, backends: list[str]) -> list[_Impl]:
    impls = [_Impl(name, name, lambda x, bwd, name=name: attnhub_runner(x, name, bwd,
                                                                          cfg.offsets))
             for name in backends]
    if cfg.auto:
        impls.append(_Impl(AUTO, None, lambda x, bwd: attnhub_runner(x, None, bwd, cfg.offsets)))
    if cfg.direct:
        impls += [_Impl(d.label, d.backend, d.build, d) for d in direct_kernels_for(backends)]
    return impls


def implementation_labels(cfg: BenchConfig) -> list[str]:
    """The report's columns, in order."""
    return [impl.label for impl in _impls(cfg, cfg.backends or [])]


def _verdicts(x: CellInputs, offsets: str) -> tuple[dict[str, list[str]], str | None]:
    """({backend: reasons}, the automatic choice) for the cell's call, computing nothing."""
    args, kwargs = attnhub_call_args(x, offsets)
    problem, _ = normalize(*args, **kwargs)
    explanation = explain_problem(problem)
    return {v.backend: list(v.reasons) for v in explanation}, explanation.selected


def _error(exc: BaseException) -> str:
    """The exception's type and its first two non-empty lines, at most 300 characters."""
    lines = [line.strip() for line in f"{type(exc).__name__}: {exc}".splitlines()]
    text = " / ".join([line for line in lines if line][:2])
    return text if len(text) <= 300 else text[:297] + "..."


def _prepare(cell: Cell, mode: str, impl: _Impl, x: CellInputs,
             reasons: dict[str, list[str]], selected: str | None
             ) -> tuple[Measurement, Callable[[], object] | None]:
    """The measurement record of one implementation on a cell, and the call to time (None
    when the implementation declines the cell: the record then says why)."""
    m = Measurement(cell.name, impl.label, mode, "n/a")
    if impl.backend is None:
        if selected is None:
            m.reason = "no backend can run this call"
            return m, None
        m.selected = selected
    else:
        why = reasons.get(impl.backend, ["not registered"])
        if why:
            m.reason = "; ".join(why)
            return m, None
    if impl.direct is not None:
        lacking = (f"timed in {', '.join(sorted(impl.direct.modes))} only"
                   if mode not in impl.direct.modes else impl.direct.unsupported(cell))
        if lacking:
            m.reason = lacking
            return m, None
    try:
        return m, impl.build(x, mode == "fwd+bwd")
    except Exception as exc:  # one backend's failure must not end the run
        m.status, m.reason = "error", _error(exc)
        return m, None


def _time_once(fn: Callable[[], object], cell: Cell, cfg: BenchConfig) -> float:
    """One round's time of ``fn`` in ms: host time per call for tiny cells (both timers
    make one untimed call first: compilation, autotuning), else device time over
    rep_ms / rounds of repeats."""
    if cell.tiny:
        rounds = max(1, cfg.host_rounds // cfg.rounds)
        return host_time_us(fn, cfg.device, calls=cfg.host_calls, rounds=rounds) / 1e3
    return device_time_ms(fn, cfg.device, warmup_ms=cfg.warmup_ms,
                          rep_ms=cfg.rep_ms / cfg.rounds)


def _measure_side_by_side(cell: Cell, mode: str, impls: list[_Impl], x: CellInputs,
                          reasons: dict[str, list[str]], selected: str | None,
                          cfg: BenchConfig, bar: Progress) -> list[Measurement]:
    """Every implementation of one cell and mode, timed in ``cfg.rounds`` interleaved rounds
    whose order alternates (forward, then reversed), so that the card's clock and
    temperature drift over a cell weigh on every implementation alike: per implementation,
    the median of its rounds (device time) or the best (host time)."""
    prepared = [_prepare(cell, mode, impl, x, reasons, selected) for impl in impls]
    times: list[list[float]] = [[] for _ in impls]
    for r in range(cfg.rounds):
        order = range(len(impls)) if r % 2 == 0 else reversed(range(len(impls)))
        for i in order:
            m, fn = prepared[i]
            if fn is None or m.status == "error":
                continue
            try:
                times[i].append(_time_once(fn, cell, cfg))
            except Exception as exc:  # one backend's failure must not end the run
                m.status, m.reason = "error", _error(exc)
    out = []
    for (m, fn), ts in zip(prepared, times, strict=True):
        if fn is not None and m.status != "error" and ts:
            m.ms = min(ts) if cell.tiny else statistics.median(ts)
            if cell.tiny:
                m.host_us = m.ms * 1e3
            m.tflops = cell.flops(mode) / (m.ms * 1e-3) / 1e12
            m.status = "ok"
        out.append(m)
        bar.step(f"{cell.name} {mode} {m.impl}")
    return out


class Progress:
    """tqdm's bar when tqdm is importable and stderr a terminal, else one stderr line per
    step (logs stay readable)."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit="run", file=sys.stderr, dynamic_ncols=True)

    def step(self, text: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
        else:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_matrix(cells: Iterable[Cell], cfg: BenchConfig, progress: bool = True
               ) -> list[Measurement]:
    """Every implementation on every cell and mode, in cell order."""
    cells = list(cells)
    if cfg.backends is None:
        cfg.backends, left_out = default_backends(cfg.device)
        cfg.left_out.update(left_out)
    impls = _impls(cfg, cfg.backends)
    total = sum(len(c.modes) for c in cells) * len(impls)
    bar = Progress(total, progress)
    results: list[Measurement] = []
    try:
        for cell in cells:
            for mode in cell.modes:
                if cfg.deadline is not None and time.monotonic() > cfg.deadline:
                    for impl in impls:
                        results.append(Measurement(cell.name, impl.label, mode, "skipped",
                                                   reason="not run: --time-limit reached"))
                        bar.step(f"{cell.name} {mode} skipped")
                    continue
                results += _run_cell_mode(cell, mode, impls, cfg, bar)
    finally:
        bar.close()
    return results


def _run_cell_mode(cell: Cell, mode: str, impls: list[_Impl], cfg: BenchConfig,
                   bar: Progress) -> list[Measurement]:
    out = []
    try:
        x = make_inputs(cell, cfg.device, requires_grad=mode == "fwd+bwd", seed=cfg.seed)
        reasons, selected = _verdicts(x, cfg.offsets)
    except Exception as exc:  # e.g. out of memory building the inputs
        for impl in impls:
            out.append(Measurement(cell.name, impl.label, mode, "error", reason=_error(exc)))
            bar.step(f"{cell.name} {mode} {impl.label}")
        return out
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # fallback notices: reported per cell
        out += _measure_side_by_side(cell, mode, impls, x, reasons, selected, cfg, bar)
    del x
    synchronize(cfg.device)
    if cfg.device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def as_dicts(results: list[Measurement]) -> list[dict]:
    return [asdict(m) for m in results]
