"""Timing primitives shared by `attnhub bench` and `attnhub tune`.

Device time: on CUDA, triton.testing.do_bench's median (CUDA events, L2 flushed between
calls) after its warm-up, or a CUDA-event loop when triton is absent; elsewhere a
``time.perf_counter`` loop with a synchronize after each call, median of the repeats.
Host time: the mean wall time per call of a loop that never waits for the device, best of
several rounds (what a training step or a serving loop pays on the CPU side).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    """Wait for the work queued on ``device`` (no-op for the CPU)."""
    device = torch.device(device)
    module = getattr(torch, device.type, None)
    sync = getattr(module, "synchronize", None) if device.type != "cpu" else None
    if sync is not None:
        sync()


def device_time_ms(fn: Callable[[], object], device: torch.device | str, *,
                   warmup_ms: float = 25.0, rep_ms: float = 100.0) -> float:
    """Median time of one ``fn()`` on ``device``, in milliseconds, after ``warmup_ms`` of
    warm-up, over about ``rep_ms`` of repeats (at least 3 calls)."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            from triton.testing import do_bench
        except ImportError:
            return _cuda_event_ms(fn, warmup_ms, rep_ms)
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _wall_ms(fn, device, warmup_ms, rep_ms)


def host_time_us(fn: Callable[[], object], device: torch.device | str, *, calls: int = 200,
                 rounds: int = 5) -> float:
    """Host (CPU) time per ``fn()`` call in microseconds: ``calls`` back-to-back calls without
    waiting for the device, best of ``rounds`` (one synchronize after each round, outside the
    clock)."""
    best = float("inf")
    fn()
    synchronize(device)
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        elapsed = time.perf_counter() - t0
        synchronize(device)
        best = min(best, elapsed / calls * 1e6)
    return best


def _estimate_ms(fn: Callable[[], object], device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    for _ in range(3):
        fn()
    synchronize(device)
    return max((time.perf_counter() - t0) / 3 * 1e3, 1e-3)


def _warm_up(fn: Callable[[], object], device: torch.device, warmup_ms: float,
             rep_ms: float) -> int:
    """Run ``fn`` for about ``warmup_ms``; -> how many timed repeats fill ``rep_ms`` (>= 3)."""
    fn()
    estimate = _estimate_ms(fn, device)
    for _ in range(max(1, int(warmup_ms / estimate))):
        fn()
    return max(3, int(rep_ms / estimate))


def _wall_ms(fn: Callable[[], object], device: torch.device, warmup_ms: float,
             rep_ms: float) -> float:
    times = []
    for _ in range(_warm_up(fn, device, warmup_ms, rep_ms)):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _cuda_event_ms(fn: Callable[[], object], warmup_ms: float, rep_ms: float) -> float:
    times = []
    for _ in range(_warm_up(fn, torch.device("cuda"), warmup_ms, rep_ms)):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
