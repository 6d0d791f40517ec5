"""Replaying a recorded Triton launch with new tensors, without Triton's per-call binding.

``kernel[grid](*args)`` binds and specialises every argument (pointer alignment, integers
equal to 1 or divisible by 16), builds a cache key and looks the compiled kernel up on every
call: with the forward's 56 arguments that is about 25 us of host time on the H200 machine,
more than the launcher itself (benchmarks/profile_triton_launch.py). A ``LaunchRecord`` keeps
the compiled kernel and the bound arguments of one real launch; replaying it puts new tensors
in the named dynamic argument slots and calls the compiled kernel's launcher, as
``JITFunction.run`` does after its lookup. A dynamic slot that held a host TMA descriptor
takes the new base tensor: the replay rebuilds the descriptor over it.

On Triton 3.6 (the version this was measured on) with no launch hooks installed, a replay
skips Triton's Python launcher too (``CudaLauncher.__call__`` and its per-call expansion of
descriptors into CUtensorMaps, 10-12 us on the H200 machine): the record keeps the launcher's
full argument list, expanded once, and calls its compiled entry point with the new tensors
and, for descriptors, a CUtensorMap encoded once per base address (the map holds nothing
else that changes). Any other Triton, hooks (a profiler), or a launcher that needs scratch
memory take Triton's launcher.

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
    import triton
    from triton import knobs
    from triton.runtime.driver import driver
except ImportError:  # triton < 3.4 has no knobs: no replay
    knobs = driver = None

MAX_PROBLEMS = 256  # as many as attnhub's call plans (attnhub.plans.MAX_PLANS)
# Tritons whose launcher layout the direct launch was written against and checked with
DIRECT_LAUNCH_VERSIONS = ("3.6.",)
MAX_TENSOR_MAPS = 64  # CUtensorMaps kept per descriptor slot, by base address
# Calls with ALiBi slopes or sinks replay too, their tensors (and the backward's row sums for
# dsinks) in dynamic slots of their own (off: such calls take the full launch every time)
FEATURES = True


def _is_descriptor(value) -> bool:
    return hasattr(value, "base") and hasattr(value, "block_shape")


def _hooks_idle() -> bool:
    """No launch hook installed (Triton 3.6 keeps empty HookChains, older ones None)."""
    runtime = knobs.runtime
    return not getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook) and \
        not getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook)


class _TensorMaps:
    """CUtensorMaps of one descriptor slot, by base address: Triton's own encoding
    (make_tensordesc_arg) of the recorded descriptor rebased on a new tensor."""

    __slots__ = ("_encode", "_maps", "_meta", "_template")

    def __init__(self, template, meta, encode) -> None:
        self._template, self._meta, self._encode = template, meta, encode
        self._maps: dict[int, object] = {}

    def __call__(self, base):
        ptr = base.data_ptr()
        found = self._maps.get(ptr)
        if found is None:
            if len(self._maps) >= MAX_TENSOR_MAPS:
                self._maps.clear()
            found = self._maps[ptr] = self._encode(rebased(self._template, base), self._meta)[0]
        return found


class _DirectLaunch:
    """The compiled launcher's entry point with the full argument list of one launch (grid,
    function, metadata, the kernel's arguments with descriptors expanded); replays replace
    the stream and the dynamic slots' entries."""

    __slots__ = ("_args", "_entries", "_launch")

    STREAM = 3  # position of the stream in the entry point's arguments

    def __init__(self, launch, args: list, entries: tuple) -> None:
        self._launch, self._args, self._entries = launch, args, entries

    @classmethod
    def build(cls, kernel, grid: tuple[int, int, int], values: list,
              slots: tuple[int, ...]) -> _DirectLaunch | None:
        if driver is None or not triton.__version__.startswith(DIRECT_LAUNCH_VERSIONS):
            return None
        try:
            from triton.backends.nvidia.driver import make_tensordesc_arg

            launcher = kernel.run
            if launcher.global_scratch_size or launcher.profile_scratch_size:
                return None
            launch = launcher.launch
            code = getattr(launch, "__code__", None)
            desc_meta: dict[int, object] = {}
            if code is not None:  # wrap_handle_tensordesc's closure over the entry point
                cells = dict(zip(code.co_freevars, (c.cell_contents for c in launch.__closure__),
                                 strict=True))
                launch = cells["launcher"]
                indices, meta = sorted(cells["tensordesc_indices"]), cells["tensordesc_meta"]
                desc_meta = dict(zip(indices, meta, strict=True))
            if getattr(launch, "__code__", None) is not None:  # not the compiled entry point
                return None
            args = [*grid, None, kernel.function, launcher.launch_cooperative_grid,
                    launcher.launch_pdl, None, None, kernel.packed_metadata, None, None, None]
            position = {}
            for i, value in enumerate(values):
                position[i] = len(args)
                if i in desc_meta:
                    args.extend(make_tensordesc_arg(value, desc_meta[i]))
                else:
                    args.append(value)
            entries = []
            for slot in slots:
                if slot in desc_meta and desc_meta[slot] is not None:  # a CUtensorMap
                    entries.append((position[slot], _TensorMaps(values[slot], desc_meta[slot],
                                                                make_tensordesc_arg)))
                else:  # a pointer, or a descriptor Triton passes as its base pointer
                    entries.append((position[slot], None))
            return cls(launch, args, tuple(entries))
        except Exception:  # another launcher layout: Triton's launcher then
            return None

    def __call__(self, stream: int, tensors: Sequence) -> None:
        args = self._args.copy()
        args[self.STREAM] = stream
        for (pos, maps), tensor in zip(self._entries, tensors, strict=True):
            args[pos] = tensor if maps is None else maps(tensor)
        self._launch(*args)


class LaunchRecord:
    """One compiled launch: the kernel, its grid and bound arguments, and the positions of
    the arguments each replay replaces."""

    __slots__ = ("_device", "_direct", "_grid", "_kernel", "_slots", "_templates", "_values")

    def __init__(self, kernel, grid: tuple[int, int, int], values: list, slots: tuple[int, ...],
                 device: int) -> None:
        self._kernel = kernel
        self._grid = grid
        self._values = values
        self._slots = slots
        self._device = device
        # the recorded descriptor of each slot that held one (replays pass its new base)
        self._templates = tuple(values[s] if _is_descriptor(values[s]) else None for s in slots)
        self._direct = _DirectLaunch.build(kernel, grid, values, slots)

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

    def repeating(self, *indices: int) -> _Repeating:
        """This record as a callable that takes the tensors of its first dynamic slots and
        passes ``tensors[i]`` for each of ``indices`` again into the remaining ones (a kernel
        that reads one tensor through two descriptors)."""
        return _Repeating(self, indices)

    def __call__(self, *tensors) -> bool:
        """Launch again with ``tensors`` in the dynamic slots (a descriptor's slot takes its
        new base tensor), on the current stream; False (nothing launched) when the current
        device is not the recorded one."""
        active = driver.active
        device = active.get_current_device()
        if device != self._device:
            return False
        stream = active.get_current_stream(device)
        direct = self._direct
        if direct is not None and _hooks_idle():
            try:
                direct(stream, tensors)
                return True
            except TypeError:  # the entry point refused the arguments: Triton's path
                self._direct = None
        values = self._values.copy()
        for slot, template, tensor in zip(self._slots, self._templates, tensors, strict=True):
            values[slot] = tensor if template is None else rebased(template, tensor)
        kernel, grid = self._kernel, self._grid
        runtime = knobs.runtime
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   kernel.launch_metadata(grid, stream, *values), runtime.launch_enter_hook,
                   runtime.launch_exit_hook, *values)
        return True


class _Repeating:
    """LaunchRecord.repeating's callable."""

    __slots__ = ("_indices", "_record")

    def __init__(self, record: LaunchRecord, indices: tuple[int, ...]) -> None:
        self._record, self._indices = record, indices

    def __call__(self, *tensors) -> bool:
        return self._record(*tensors, *(tensors[i] for i in self._indices))


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

    def peek(self, problem: object, key: tuple) -> object:
        """The record stored for ``problem`` and ``key``, or None (True: not yet recorded);
        unlike ``get``, a problem never seen stays unseen."""
        entry = self._entries.get(id(problem))
        if entry is None or entry[0] is not problem:
            return None
        return entry[1].get(key, True)

    def put(self, problem: object, key: tuple, record: object) -> None:
        """Store ``record`` (None: this launch is never replayed)."""
        entry = self._entries.get(id(problem))
        if entry is not None and entry[0] is problem:
            entry[1][key] = record

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


def present(**slots) -> tuple[tuple[str, ...], tuple]:
    """(names, tensors) of the ``slots`` (kernel parameter name = tensor or None) that hold
    a tensor, in the order given: the optional dynamic slots of a record and their values."""
    names = tuple(name for name, t in slots.items() if t is not None)
    return names, tuple(slots[name] for name in names)


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
