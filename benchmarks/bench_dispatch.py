"""Dispatch overhead and adapter speed: attnhub's CUDA adapters called directly vs through
attnhub, side by side in one run, markdown out.

    python benchmarks/bench_dispatch.py --out docs/benchmarks/DATE-h200-dispatch.md   # GPU
    python benchmarks/bench_dispatch.py --cpu-overhead                                 # CPU

GPU part 1, host overhead: a host loop of tiny calls (8 sequences x 64 tokens, bf16, 32/8
heads, head_dim 128, device cu_seqlens, max_seqlen given), microseconds per call: the aten op
called directly, attnhub -> torch-flash, torch's own varlen_attn when present, FA4 directly
and through attnhub when flash_attn.cute imports. GPU part 2: W1-W3 (benchmarks/workloads.py), fwd
and fwd+bwd, each adapter directly vs through attnhub (triton.testing.do_bench, median, random
inputs). CPU mode: the same host loop on CPU tensors with a trivial backend (returns a
preallocated tensor), isolating normalize + select against the plan cache.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import inspect
import pathlib
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workloads import HEAD_DIM, NHEADS, NHEADS_K, workload_inputs, workloads

import attnhub
from attnhub import plans
from attnhub.bench.direct import direct_kernels_for
from attnhub.bench.inputs import CellInputs, attnhub_runner
from attnhub.bench.matrix import Cell

TINY = (8, 64)  # sequences x tokens


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def per_call_us(fn, calls: int = 2000, repeats: int = 5, sync=None) -> float:
    """Best of ``repeats`` host loops of ``calls`` calls, microseconds per call (the loop
    ends with a device synchronisation when ``sync`` is given)."""
    for _ in range(50):
        fn()
    if sync:
        sync()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync:
            sync()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def interleaved(paths: list[tuple[str, object]], sync, calls: int = 2000, rounds: int = 15
                ) -> list[tuple[str, float]]:
    """(name, median over ``rounds`` of the host-loop time per call in us) for each path,
    the paths taking turns within every round."""
    for _, fn in paths:
        for _ in range(200):
            fn()
    sync()
    times: dict[str, list[float]] = {name: [] for name, _ in paths}
    for _ in range(rounds):
        for name, fn in paths:
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return [(name, statistics.median(times[name])) for name, _ in paths]


def _tiny(device: str, dtype: torch.dtype):
    g = torch.Generator(device=device).manual_seed(0)
    total = TINY[0] * TINY[1]
    q = torch.randn(total, NHEADS, HEAD_DIM, device=device, dtype=dtype, generator=g)
    k = torch.randn(total, NHEADS_K, HEAD_DIM, device=device, dtype=dtype, generator=g)
    v = torch.randn(total, NHEADS_K, HEAD_DIM, device=device, dtype=dtype, generator=g)
    cu = torch.arange(0, total + 1, TINY[1], device=device, dtype=torch.int32)
    return q, k, v, cu


def full_path(fn):
    """``fn`` with the plan cache bypassed (every call normalizes and selects)."""
    def run():
        get = plans.get
        plans.get = lambda key: None
        try:
            return fn()
        finally:
            plans.get = get
    return run


def cpu_overhead() -> str:
    class Trivial(attnhub.Backend):
        name, device_types, priority = "trivial", frozenset({"cpu"}), 10
        capabilities = attnhub.Capabilities(dtypes=frozenset({torch.bfloat16}))

        def forward(self, problem, inputs):
            return attnhub.ForwardResult(self.out, self.lse)

        def forward_out(self, problem, inputs):
            return self.out

    from attnhub.registry import Registry, reset_registry

    backend = Trivial()
    registry = Registry()
    registry.add_plugin(_plugin(backend))
    reset_registry(registry)
    q, k, v, cu = _tiny("cpu", torch.bfloat16)
    info = attnhub.VarlenInfo.from_cu_seqlens(cu)
    backend.out, backend.lse = torch.empty_like(q), torch.empty(NHEADS, q.shape[0])

    def direct():
        return backend.forward_out(None, None)

    def through(cu_arg):
        return lambda: attnhub.attention_forward_varlen(q, k, v, cu_arg, cu_arg, causal=True)

    rows = [("trivial kernel called directly", per_call_us(direct)),
            ("attnhub, VarlenInfo, plan cache", per_call_us(through(info))),
            ("attnhub, VarlenInfo, full path (normalize + select)",
             per_call_us(full_path(through(info)), calls=500))]
    base = rows[0][1]
    lines = [f"# attnhub dispatch overhead on the CPU ({platform.processor() or platform.machine()}"
             f", torch {torch.__version__}, {datetime.date.today()})", "",
             "Host loop of tiny calls (8 x 64 tokens, bf16, 32/8 heads, d 128), a trivial "
             "backend returning a preallocated tensor.", "",
             "| path | us per call | over direct |", "|---|---|---|"]
    lines += [f"| {name} | {us:.2f} | {us - base:+.2f} |" for name, us in rows]
    return "\n".join(lines)


def _plugin(backend):
    import types

    module = types.ModuleType("bench_plugin")

    @attnhub.hookimpl
    def attnhub_register_backends(register):
        register(backend)

    module.attnhub_register_backends = attnhub_register_backends
    return module


def _fa4():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:
        print(f"FA4 not available: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None
    return flash_attn_varlen_func


def _varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def gpu_overhead(fa4) -> list[str]:
    q, k, v, cu = _tiny("cuda", torch.bfloat16)
    m = TINY[1]
    scale = HEAD_DIM ** -0.5
    sync = torch.cuda.synchronize
    aten = torch.ops.aten._flash_attention_forward
    rows = []

    def aten_packet():
        return aten(q, k, v, cu, cu, m, m, 0.0, True, False, scale=scale)[0]

    def aten_overload():
        return aten.default(q, k, v, cu, cu, m, m, 0.0, True, False, scale=scale)[0]

    def attnhub_torch_flash():
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, m, m, causal=True,
                                                backend="torch-flash")

    def attnhub_auto():
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, m, m, causal=True)

    # The three paths the target compares are timed interleaved (round-robin, median of
    # rounds), so that clock and load drift hit them alike.
    rows += interleaved([
        ("aten op directly (torch.ops.aten._flash_attention_forward)", aten_packet),
        ("aten overload directly (.default)", aten_overload),
        ("attnhub -> torch-flash (backend='torch-flash')", attnhub_torch_flash)], sync)
    rows.append(("attnhub -> torch-flash, full path (plan cache bypassed)",
                 per_call_us(full_path(attnhub_torch_flash), calls=500, sync=sync)))
    chosen = attnhub.explain(q, k, v, cu, cu, m, m, causal=True).selected
    rows.append((f"attnhub, automatic selection (-> {chosen})",
                 per_call_us(attnhub_auto, sync=sync)))
    info = attnhub.VarlenInfo.from_lengths([TINY[1]] * TINY[0], "cuda")
    rows.append(("attnhub -> triton, device cu_seqlens (tiles found in the kernel)",
                 per_call_us(lambda: attnhub.attention_forward_varlen(
                     q, k, v, cu, cu, m, m, causal=True, backend="triton"), sync=sync)))
    rows.append(("attnhub -> triton, VarlenInfo (host tile list, cached)",
                 per_call_us(lambda: attnhub.attention_forward_varlen(
                     q, k, v, info, info, causal=True, backend="triton"), sync=sync)))
    varlen_attn = _varlen_attn()
    if varlen_attn is not None:
        params = inspect.signature(varlen_attn).parameters
        causal_kw = ({"window_size": (-1, 0)} if "window_size" in params
                     else {"is_causal": True})
        if "enable_gqa" in params:
            causal_kw["enable_gqa"] = True
        rows.append(("torch.nn.attention.varlen.varlen_attn",
                     per_call_us(lambda: varlen_attn(q, k, v, cu, cu, m, m, **causal_kw),
                                 sync=sync)))
    if fa4 is not None:
        rows.append(("FA4 flash_attn_varlen_func directly",
                     per_call_us(lambda: fa4(q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu,
                                             max_seqlen_q=m, max_seqlen_k=m, causal=True),
                                 sync=sync)))
        rows.append(("attnhub -> fa4 (backend='fa4')",
                     per_call_us(lambda: attnhub.attention_forward_varlen(
                         q, k, v, cu, cu, m, m, causal=True, backend="fa4"), sync=sync)))
    gpu_ms = _cuda_ms(aten_packet)
    base = rows[0][1]
    lines = ["## Host overhead: tiny calls (8 x 64 tokens, bf16, 32/8 heads, d 128, causal, "
             "device cu_seqlens, max_seqlen given)", "",
             f"GPU time of one call (CUDA events, aten op): {gpu_ms * 1e3:.1f} us. Target: "
             "attnhub -> torch-flash at most 3 us over the aten op directly.", "",
             "| path | us per call (host loop) | over the aten op |", "|---|---|---|"]
    lines += [f"| {name} | {us:.1f} | {us - base:+.1f} |" for name, us in rows]
    return lines


def _cuda_ms(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def workload_rows(fa4, names: list[str]) -> list[str]:
    """W1-W3: each adapter directly vs through attnhub, fwd and fwd+bwd, TFLOP/s."""
    lines = ["## W1-W3: adapters directly vs through attnhub (TFLOP/s, median of 3 alternating "
             "do_bench medians)", "",
             "| workload | mode | kernel | direct | attnhub | attnhub / direct |",
             "|---|---|---|---|---|---|"]
    for w in (w for w in workloads() if w.name in names):
        info = attnhub.VarlenInfo.from_lengths(w.seqlens_q, "cuda")
        for causal in (False, True):
            for grad in (False, True):
                q, k, v, dout = workload_inputs(w, grad)
                flops = w.flops(causal, backward=grad)
                impls = _impls(w, q, k, v, dout, info, causal, grad, fa4)
                for kernel, (direct, through) in impls.items():
                    # Alternating rounds, median of each side: GPU clock drift over the
                    # seconds of one measurement (a few percent on W2) hits both alike.
                    ms = {direct: [], through: []}
                    for _ in range(3):
                        for f in (direct, through):
                            ms[f].append(_cuda_ms(f))
                    d, t = (flops / statistics.median(ms[f]) / 1e9 for f in (direct, through))
                    mode = ("fwd+bwd" if grad else "fwd")
                    lines.append(f"| {w.name}{' causal' if causal else ''} | {mode} | {kernel} "
                                 f"| {d:.0f} | {t:.0f} | {t / d:.3f} |")
                del q, k, v, dout, impls
                torch.cuda.empty_cache()
    return lines


def _impls(w, q, k, v, dout, info, causal, grad, fa4):
    """kernel -> (called directly, through attnhub): the direct calls are attnhub.bench's."""
    cell = Cell(w.name, "workload", w.name, w.seqlens_q, w.seqlens_k, NHEADS, NHEADS_K,
                HEAD_DIM, "bfloat16", causal=causal)
    x = CellInputs(cell, q, k, v, dout, info, info, None, None, grad)
    kernels = ["torch-flash"] + (["fa4"] if fa4 is not None else [])
    return {d.backend: (d.build(x, grad), attnhub_runner(x, d.backend, grad))
            for d in direct_kernels_for(kernels) if d.name is None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the markdown report here too")
    parser.add_argument("--cpu-overhead", action="store_true",
                        help="only the CPU host-overhead loop with a trivial backend")
    parser.add_argument("--workloads", default="W1,W2,W3")
    args = parser.parse_args()
    if args.cpu_overhead:
        text = cpu_overhead()
    else:
        import triton

        fa4 = _fa4()
        props = torch.cuda.get_device_properties(0)
        head = [f"# attnhub dispatch: CUDA adapters directly vs through attnhub "
                f"({datetime.date.today()})", "",
                f"Device: {props.name} (sm_{props.major}{props.minor}); torch "
                f"{torch.__version__}, triton {triton.__version__}, flash-attn-4 "
                f"{_version('flash-attn-4')}, flash-attn {_version('flash-attn')}.", ""]
        text = "\n".join(head + gpu_overhead(fa4) + [""]
                         + workload_rows(fa4, args.workloads.split(",")))
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
