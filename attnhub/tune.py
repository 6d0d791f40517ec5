"""`attnhub tune`: measure each backend per problem class on this device, write a cost table.

For every class of the tune list (``default_cases``, filtered by class-key patterns), one
representative call with random data is built, classified by the same code selection uses
(``problem_class.classify``), and run through ``attnhub.attention_forward_varlen`` forced to
each backend that can compute it (forward, or forward + backward when the class has
backward). The cost of a backend is ``attnhub.timing.device_time_ms``; on an accelerator, when
that is under ``HOST_BOUND_MS``, the larger of it and ``timing.host_time_us`` (a call loop
cannot go faster than its host path). The table (attnhub.cost_tables format) is rewritten
after every class, so an interrupted run keeps what it measured, and ``resume`` skips classes
the output already holds.
"""

from __future__ import annotations

import datetime
import fnmatch
import importlib.metadata
import pathlib
import platform
import random
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cost_tables, custom_mask, dispatch, timing
from .normalize import normalize
from .problem_class import ProblemClass, classify, size_bucket
from .registry import get_registry

HOST_BOUND_MS = 0.5  # below this device time, the host path may be what a call loop pays
PAGE_SIZE = 16
SOFTCAP = 30.0
# (nheads, nheads_k) per GQA bucket: MHA, GQA 4 (the 32/8 tiny call), MQA
HEADS = {"1": (16, 16), "2-8": (32, 8), "9+": (32, 1)}


@dataclass(frozen=True)
class TuneCase:
    """One class to measure, as the representative call's parameters."""

    dtype: torch.dtype
    head_dim: int
    group: str
    mask: str
    length: str
    backward: bool

    def intended(self) -> ProblemClass:
        return ProblemClass(str(self.dtype).removeprefix("torch."), self.head_dim, self.group,
                            self.mask, self.length, self.backward)


def default_cases(device_type: str, full: bool = False) -> list[TuneCase]:
    """The tune list, most common classes first (a budget-limited run measures those). On an
    accelerator, bfloat16 (float16 calls use the bfloat16 entries): head dim 128 with GQA and
    every mask; every other head dim with GQA, causal or not; MHA and MQA at head dims 128 and
    64, causal or not (about 250 classes, the tiny ones with device offsets and with host
    lengths: a 10-12 minute run on an H100 / H200 with three or four backends). ``full``
    adds every mask at every head dim and GQA ratio (about 1050). On the CPU, float32 with
    head dims 64 and 128 likewise, tiny calls one way (their offsets are host data)."""
    cpu = device_type == "cpu"
    dtype = torch.float32 if cpu else torch.bfloat16
    lengths = ("tiny", "short", "medium", "long", "decode") if cpu else \
        ("tiny", "tiny-host", "short", "medium", "long", "decode")
    head_dims = (64, 128) if cpu else (128, 64, 256, 96, 192)
    masks = ("none", "causal", "window", "alibi", "custom") if cpu else \
        ("none", "causal", "window", "softcap", "alibi", "paged", "custom")
    out: list[TuneCase] = []

    def add(head_dim: int, group: str, mask: str) -> None:
        for length in lengths:
            if mask == "paged" and length.startswith("tiny"):
                continue
            for backward in (False, True):
                if backward and (length == "decode" or mask == "paged"):
                    continue  # decode and paged K/V are inference regimes
                case = TuneCase(dtype, head_dim, group, mask, length, backward)
                if case not in out:
                    out.append(case)

    plain = ("causal", "none")
    for mask in plain + masks[2:]:
        add(head_dims[0], "2-8", mask)
    for head_dim in head_dims[1:]:
        for mask in plain:
            add(head_dim, "2-8", mask)
    for head_dim in head_dims[:2]:
        for group in ("1", "9+"):
            for mask in plain:
                add(head_dim, group, mask)
    if full:
        for head_dim in head_dims:
            for group in ("2-8", "1", "9+"):
                for mask in plain + masks[2:]:
                    add(head_dim, group, mask)
    return out


def _uniform(total: int, lo: int, hi: int, rng: random.Random) -> tuple[int, ...]:
    out: list[int] = []
    while sum(out) < total:
        out.append(min(rng.randint(lo, hi), total - sum(out)))
    return tuple(out)


def representative_lengths(length: str, device_type: str, rng: random.Random
                           ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(seqlens_q, seqlens_k) of a call in length bucket ``length``; smaller on the CPU."""
    cpu = device_type == "cpu"
    if length in ("tiny", "tiny-host"):
        lens = (64,) * 8
        return lens, lens
    if length == "decode":
        kv = _uniform(16384 if cpu else 65536, 256, 1024 if cpu else 4096, rng)
        return (1,) * len(kv), kv
    if length == "short":
        lens = _uniform(16384, 1, 256, rng)
    elif length == "medium":
        lens = _uniform(4096 if cpu else 16384, 257, 1024 if cpu else 4096, rng)
    else:
        lens = (4160,) if cpu else _uniform(32768, 1024, 16384, rng)
    return lens, lens


def _offsets(lengths: tuple[int, ...], device: torch.device) -> torch.Tensor:
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return torch.tensor(cu, dtype=torch.int32, device=device)


def class_seed(case: TuneCase) -> int:
    """The seed of ``case``'s representative call: a function of its class key alone, so that
    every run measures a class on the same lengths and data, whichever other classes (and
    backends) it measures; a run that re-measures one backend then compares it with the
    others' figures on the same call."""
    return zlib.crc32(case.intended().key().encode())


def build_call(case: TuneCase, device: torch.device, seed: int | None = None) -> dict:
    """attention_forward_varlen's keyword arguments for ``case``'s representative call, with
    random lengths (in its bucket) and data from ``seed`` (default: ``class_seed``); q, k, v
    are leaf tensors requiring grad when it has backward."""
    seed = class_seed(case) if seed is None else seed
    rng = random.Random(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    seqlens_q, seqlens_k = representative_lengths(case.length, device.type, rng)
    nheads, nheads_k = HEADS[case.group]
    d = case.head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device=device, dtype=case.dtype)

    cu_q = _offsets(seqlens_q, device)  # self-attention passes one tensor for both, as here
    cu_k = cu_q if seqlens_k == seqlens_q else _offsets(seqlens_k, device)
    kwargs: dict = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
                    "max_seqlen_q": max(seqlens_q), "max_seqlen_k": max(seqlens_k),
                    "causal": case.mask not in ("none", "custom")}
    q = rand(sum(seqlens_q), nheads, d)
    if case.mask == "paged":
        pages = [-(-n // PAGE_SIZE) for n in seqlens_k]
        order = torch.randperm(sum(pages), generator=gen, device=device).to(torch.int32)
        table = torch.zeros(len(pages), max(pages), dtype=torch.int32, device=device)
        start = 0
        for b, n in enumerate(pages):
            table[b, :n] = order[start:start + n]
            start += n
        k, v = (rand(sum(pages), PAGE_SIZE, nheads_k, d) for _ in range(2))
        kwargs["block_table"] = table
    else:
        k, v = (rand(sum(seqlens_k), nheads_k, d) for _ in range(2))
    if case.mask == "window":
        kwargs["window_size"] = (max(16, max(seqlens_k) // 4), 0)
    elif case.mask == "softcap":
        kwargs["softcap"] = SOFTCAP
    elif case.mask == "alibi":
        from .conformance.inputs import alibi_slopes

        kwargs["alibi_slopes"] = alibi_slopes(nheads).to(device)
    elif case.mask == "custom":
        nbits = sum(a * b for a, b in zip(seqlens_q, seqlens_k, strict=True))
        bits = torch.randint(0, 256, (-(-nbits // 8),), generator=gen, device=device,
                             dtype=torch.int32).to(torch.uint8)
        kwargs["custom_mask"] = custom_mask.PackedMask(bits,
                                                       custom_mask.block_offsets(cu_q, cu_k))
    if case.length == "tiny-host":  # host lengths, as a VarlenInfo built once per step passes
        from .varlen_info import VarlenInfo

        kwargs["cu_seqlens_q"] = VarlenInfo.from_lengths(seqlens_q, device)
        kwargs["cu_seqlens_k"] = (kwargs["cu_seqlens_q"] if seqlens_k == seqlens_q
                                  else VarlenInfo.from_lengths(seqlens_k, device))
        del kwargs["max_seqlen_q"], kwargs["max_seqlen_k"]
    for name, t in (("q", q), ("k", k), ("v", v)):
        kwargs[name] = t.requires_grad_(case.backward)
    return kwargs


def problem_of(kwargs: dict):
    """The VarlenProblem of a built call (what selection sees)."""
    args = {k: v for k, v in kwargs.items() if k not in ("q", "k", "v", "cu_seqlens_q",
                                                         "cu_seqlens_k", "max_seqlen_q",
                                                         "max_seqlen_k")}
    return normalize(kwargs["q"], kwargs["k"], kwargs["v"], kwargs["cu_seqlens_q"],
                     kwargs["cu_seqlens_k"], kwargs.get("max_seqlen_q"),
                     kwargs.get("max_seqlen_k"), **args)[0]


def _runner(kwargs: dict, backend: str, backward: bool) -> Callable[[], object]:
    from .api import attention_forward_varlen

    def forward():
        return attention_forward_varlen(**kwargs, backend=backend)

    if not backward:
        return forward
    leaves = (kwargs["q"], kwargs["k"], kwargs["v"])
    dout = torch.randn_like(kwargs["q"])

    def forward_backward():
        return torch.autograd.grad(forward(), leaves, dout)

    return forward_backward


def measure(fn: Callable[[], object], device: torch.device, warmup_ms: float, rep_ms: float
            ) -> float:
    """Milliseconds per call of ``fn`` as a call loop pays it (see the module docstring)."""
    ms = timing.device_time_ms(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if device.type != "cpu" and ms < HOST_BOUND_MS:
        ms = max(ms, timing.host_time_us(fn, device, calls=100, rounds=3) / 1e3)
    return ms


def default_backends(device_type: str) -> list[str]:
    """Available backends of the device type that automatic selection can choose: the
    fallback (reference) only on the CPU, where it is a real contender; nothing ranked below
    a fallback backend (the interpreted Triton kernels, the NPU simulator: forced only)."""
    registry = get_registry()
    ranked = registry.for_device(device_type)
    floor = max((b.priority for b in ranked if b.fallback), default=None)
    return [b.name for b in ranked
            if not registry.unavailable_reasons(b)
            and (floor is None or b.priority >= floor)
            and (not b.fallback or device_type == "cpu")]


@dataclass
class TuneResult:
    path: pathlib.Path
    table: cost_tables.CostTable
    measured: list[str]  # class keys measured in this run
    skipped: list[str]  # class keys skipped (resume, no backend could run them)
    stopped_by_budget: bool


def tune(device: str | torch.device, *, backends: list[str] | None = None,
         patterns: list[str] | None = None, output: str | pathlib.Path | None = None,
         budget_s: float | None = None, resume: bool = False, match_name: str | None = None,
         full: bool = False, warmup_ms: float = 10.0, rep_ms: float = 40.0,
         progress: Callable[[str], None] = print) -> TuneResult:
    """Measure the classes of ``default_cases`` (``full``: the long list) whose key matches
    one of ``patterns`` (fnmatch, e.g. ``"*/d128/*/causal/*"``; all when None) with
    ``backends`` (default: ``default_backends``) and write the table to ``output`` (default:
    the user-tuned table of this device in the cache directory), merged into the table
    already there (``merge_costs``: a class keeps the entries of backends this run does not
    measure, so that one backend can be re-measured after an upgrade). ``match_name``:
    write a shipped-table match block (this device's type and capability, that regular
    expression on the device name) instead of naming this device only. Stops starting new
    classes after ``budget_s`` seconds."""
    start = time.perf_counter()
    device = torch.device(device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    registry = get_registry()
    if backends is None:
        backends = default_backends(device.type)
    for name in backends:
        dispatch._check_name(name, "attnhub tune --backend")
    identity = cost_tables.device_identity(device.type)
    path = pathlib.Path(output) if output is not None else cost_tables.user_table_path(identity)
    table = _existing(path, identity) or cost_tables.CostTable(identity.as_dict(), {})
    table.device = identity.as_dict()
    if match_name is not None:
        table.match = {"type": identity.type, "capability": identity.capability,
                       "name_pattern": match_name}
    table.extra.update({
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "versions": _versions(table.extra.get("versions", {}), backends),
        "settings": {"warmup_ms": warmup_ms, "rep_ms": rep_ms, "host_bound_ms": HOST_BOUND_MS,
                     "backends": list(backends)},
        "measured_backends": {**table.extra.get("measured_backends", {}), **{
            name: datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
            for name in backends}},
    })
    shapes = table.extra.setdefault("shapes", {})
    failures = table.extra.setdefault("failures", {})
    cases = [c for c in default_cases(device.type, full)
             if not patterns or any(fnmatch.fnmatchcase(c.intended().key(), p)
                                    for p in patterns)]
    progress(f"attnhub tune: {len(cases)} classes x {len(backends)} backends "
             f"({', '.join(backends)}) on {identity.name} -> {path}")
    measured: list[str] = []
    skipped: list[str] = []
    stopped = False
    for i, case in enumerate(cases, 1):
        key = case.intended().key()
        if resume and key in table.classes:
            skipped.append(key)
            continue
        if budget_s is not None and time.perf_counter() - start > budget_s:
            stopped = True
            progress(f"budget of {budget_s:.0f} s spent: stopping before class {i} of "
                     f"{len(cases)} (run again with --resume to continue)")
            break
        kwargs = build_call(case, device)
        problem = problem_of(kwargs)
        key = classify(problem, size_bucket(problem)).key()  # what selection will look up
        if key != case.intended().key():
            progress(f"note: the call built for {case.intended().key()} classifies as {key}")
        costs: dict[str, float] = {}
        failed: dict[str, str] = {}
        for name in backends:
            if dispatch.verdict(registry.backends[name], problem):
                continue
            try:
                costs[name] = round(measure(_runner(kwargs, name, case.backward), device,
                                            warmup_ms, rep_ms), 5)
            except Exception as exc:  # one backend failing (OOM, compile error) ends no run
                failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        del kwargs
        if failed:
            failures[key] = failed
        if not costs:
            skipped.append(key)
            progress(f"[{i}/{len(cases)}] {key}: no backend can run it"
                     + (f" ({'; '.join(f'{b}: {m}' for b, m in failed.items())})" if failed
                        else ""))
            continue
        table.classes[key] = merge_costs(table.classes.get(key, {}), costs, backends)
        shapes[key] = _describe(problem)
        measured.append(key)
        winner = cost_tables.choose(
            [(b.name, b.priority) for b in registry.for_device(device.type)
             if b.name in costs], costs)
        progress(f"[{i}/{len(cases)}] {key}: "
                 + "  ".join(f"{b} {ms:.4g} ms" for b, ms in costs.items()) + f"  -> {winner}"
                 + (f"  (failed: {', '.join(failed)})" if failed else ""))
        cost_tables.write_table(table, path)
    if measured:
        cost_tables.write_table(table, path)
    dispatch.clear_cache()  # selections made before this run used the old table
    progress(f"measured {len(measured)} classes in {time.perf_counter() - start:.0f} s; "
             f"table: {path}")
    return TuneResult(path, table, measured, skipped, stopped)


def merge_costs(old: dict[str, float], costs: dict[str, float], backends: list[str]
                ) -> dict[str, float]:
    """A class's entry after a run that measured ``backends`` and got ``costs`` (ms): the
    old entries of backends the run did not measure, then the new ones (a measured backend
    that declined or failed this time loses its old entry)."""
    return {**{b: ms for b, ms in old.items() if b not in backends}, **costs}


def _existing(path: pathlib.Path, identity: cost_tables.DeviceIdentity
              ) -> cost_tables.CostTable | None:
    """The table already at ``path`` when it is for this device (merged into)."""
    if not path.is_file():
        return None
    try:
        table = cost_tables.read_table(path)
    except (OSError, ValueError):
        return None  # unreadable: replaced
    if table.device.get("name") != identity.name or table.device.get("type") != identity.type:
        return None
    return table


def _describe(problem) -> str:
    return (f"{problem.batch} seqs, {problem.total_q} q / {problem.total_k} k tokens, "
            f"max {problem.max_seqlen_q}/{problem.max_seqlen_k}, heads {problem.nheads}/"
            f"{problem.nheads_k}, d{problem.head_dim}, {' '.join(problem.features()) or 'plain'}")


# The package whose version a backend's figures depend on (beyond torch's, always recorded).
BACKEND_PACKAGES = {"triton": "triton", "flash-attn": "flash-attn", "fa4": "flash-attn-4"}


def _versions(previous: dict, measured: list[str]) -> dict:
    """The run's versions (attnhub, python, torch, CUDA, and each backend package's); for
    the package of a backend this run does not measure, the ``previous`` table's value: its
    figures in the table are the earlier run's."""
    found = {"attnhub": _version("attnhub"), "python": platform.python_version(),
             "torch": torch.__version__, "cuda (torch build)": torch.version.cuda}
    for backend, package in BACKEND_PACKAGES.items():
        keep = backend not in measured and package in previous
        found[package] = previous[package] if keep else _version(package)
    return found


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
