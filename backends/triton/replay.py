"""Replaying a recorded Triton launch with new tensors, without Triton's per-call binding.

``kernel[grid](*args)`` binds and specialises every argument (pointer alignment, integers
equal to 1 or divisible by 16), builds a cache key and looks the compiled kernel up on every
call: with the forward's 56 arguments that is about 25 us of host time on the H200 machine,
more than the launcher itself (benchmarks/profile_triton_launch.py). A ``LaunchRecord`` keeps
the compiled kernel and the bound arguments of one real launch; replaying it puts new tensors
in the named dynamic argument slots and calls the compiled kernel's launcher, as
``JITFunction.run`` does after its lookup.

The caller guarantees that the replay specialises as the recorded launch did: every
non-tensor argument equal (they come from the same VarlenProblem and the same strides), every
tensor of the same dtype, and every address 16-byte aligned, as at recording
(``aligned``). ``ReplayCache`` keys records by a problem object that attnhub's call plans
reuse for every repeat of a call, held and compared by identity, and records a problem's launch
only when it is seen a second time, so a call that builds a new problem each time pays one set
insertion. Anything this Triton does not expose as expected makes recording return None:
the launch then keeps Triton's own path.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

try:
    from triton import knobs
    from triton.runtime.driver import driver
except ImportError:  # triton < 3.4 has no knobs: no replay
    knobs = driver = None

MAX_PROBLEMS = 256  # as many as attnhub's call plans (attnhub.plans.MAX_PLANS)


class LaunchRecord:
    """One compiled launch: the kernel, its grid and bound arguments, and the positions of
    the arguments each replay replaces."""

    __slots__ = ("_device", "_grid", "_kernel", "_slots", "_values")

    def __init__(self, kernel, grid: tuple[int, int, int], values: list, slots: tuple[int, ...],
                 device: int) -> None:
        self._kernel = kernel
        self._grid = grid
        self._values = values
        self._slots = slots
        self._device = device

    @classmethod
    def launch(cls, jit_fn, grid: tuple, args: Sequence, kwargs: dict,
               dynamic: Sequence[str]) -> LaunchRecord | None:
        """Launch ``jit_fn[grid](*args, **kwargs)`` through Triton and record it, the
        parameters named in ``dynamic`` being the ones replays replace (in that order)."""
        kernel = jit_fn.run(*args, grid=grid, warmup=False, **kwargs)
        if driver is None or kernel is None:
            return None
        try:
            device = driver.active.get_current_device()
            binder = jit_fn.device_caches[device][4]
            bound, _, _ = binder(*args, **kwargs)
            names = list(bound)
            slots = tuple(names.index(name) for name in dynamic)
            getattr(kernel, "run")  # noqa: B009 (set by the real launch above)
            kernel.function, kernel.packed_metadata  # noqa: B018
        except Exception:  # another Triton's internals: keep Triton's own launch path
            return None
        full = (*tuple(grid), 1, 1)[:3]
        return cls(kernel, full, list(bound.values()), slots, device)

    def __call__(self, *tensors) -> bool:
        """Launch again with ``tensors`` in the dynamic slots, on the current stream; False
        (nothing launched) when the current device is not the recorded one."""
        active = driver.active
        device = active.get_current_device()
        if device != self._device:
            return False
        values = self._values.copy()
        for slot, tensor in zip(self._slots, tensors, strict=True):
            values[slot] = tensor
        kernel, grid = self._kernel, self._grid
        stream = active.get_current_stream(device)
        runtime = knobs.runtime
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *values), runtime.launch_enter_hook,
                   runtime.launch_exit_hook, *values)
        return True


class ReplayCache:
    """Records (a LaunchRecord, or an object wrapping one) per (problem object, key): see the
    module docstring."""

    def __init__(self) -> None:
        self._entries: OrderedDict[int, tuple[object, dict]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, problem: object, key: tuple) -> object:
        """The record stored for ``problem`` and ``key``; True when the launch should be
        recorded now (the problem's second sighting); None otherwise."""
        entry = self._entries.get(id(problem))
        if entry is None or entry[0] is not problem:
            with self._lock:
                self._entries[id(problem)] = (problem, {})
                while len(self._entries) > MAX_PROBLEMS:
                    self._entries.popitem(last=False)
            return None
        record = entry[1].get(key)
        return True if record is None and key not in entry[1] else record

    def put(self, problem: object, key: tuple, record: object) -> None:
        """Store ``record`` (None: this launch is never replayed)."""
        entry = self._entries.get(id(problem))
        if entry is not None and entry[0] is problem:
            entry[1][key] = record

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def aligned(*tensors) -> bool:
    """Whether every tensor's address is 16-byte aligned (what the records were made with)."""
    bits = 0
    for t in tensors:
        bits |= t.data_ptr()
    return bits & 15 == 0


def rebased(descriptor, base):
    """A copy of a host TMA descriptor (triton.tools.tensor_descriptor or Gluon's) over
    ``base``: same shape, strides, box and layout, without re-running the dataclass checks
    (the record's descriptor passed them; ``base`` must have its dtype, row stride and a
    16-byte aligned address). Triton's launcher reads only ``base.data_ptr()`` from it."""
    copy = object.__new__(type(descriptor))
    copy.__dict__.update(descriptor.__dict__)
    copy.base = base
    return copy
