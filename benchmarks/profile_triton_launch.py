"""Where the host time of a tiny Triton call goes, on the GPU machine: attnhub's dispatch, the
backend's launch preparation, Triton's launch path (argument binding and specialisation, the
cache key, the launcher), against the aten FlashAttention-2 op.

    python benchmarks/profile_triton_launch.py              # breakdown table (markdown)
    python benchmarks/profile_triton_launch.py --cprofile   # plus cProfile of both call kinds
    python benchmarks/profile_triton_launch.py --backward   # plus forward+backward rows

Each row is the best of several host loops (no device wait inside a loop), microseconds per
call. The rows below "attnhub -> triton" replay the last launch of that call with the pieces
of Triton's ``JITFunction.run`` taken apart: the binder and cache lookup alone
(``warmup=True``), and the compiled kernel's launcher called with the bound arguments.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

import attnhub

LENGTHS = [64] * 8


def per_call_us(fn, calls: int = 2000, rounds: int = 5) -> float:
    for _ in range(100):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
        torch.cuda.synchronize()
    return best


class LaunchRecorder:
    """Records the last JITFunction.run call (the function, its arguments, the grid)."""

    def __init__(self) -> None:
        import triton.runtime.jit as jit

        self.jit = jit
        self.original = jit.JITFunction.run
        self.last = None

    def __enter__(self):
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            recorder.last = (fn, args, grid, dict(kwargs))
            return recorder.original(fn, *args, grid=grid, warmup=warmup, **kwargs)

        self.jit.JITFunction.run = run
        return self

    def __exit__(self, *exc) -> None:
        self.jit.JITFunction.run = self.original


def replay_rows(label: str, record) -> list[tuple[str, float]]:
    """The recorded launch re-run whole, binder only, and launcher only."""
    import triton.runtime.jit as jit
    from triton import knobs
    from triton.runtime.driver import driver

    fn, args, grid, kwargs = record
    kernel = fn.run(*args, grid=grid, warmup=True, **kwargs)
    device = driver.active.get_current_device()
    stream = driver.active.get_current_stream(device)
    binder = fn.device_caches[device][4]
    bound, _, _ = binder(*args, **kwargs)
    values = tuple(bound.values())
    g = tuple(grid) + (1,) * (3 - len(grid))

    def launcher():
        kernel.run(g[0], g[1], g[2], stream, kernel.function, kernel.packed_metadata, None,
                   knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *values)

    def binder_only():
        _bound, spec, opts = binder(*args, **kwargs)
        return jit.compute_cache_key(fn.device_caches[device][1], spec, opts)

    return [
        (f"{label}: Triton launch replayed (JITFunction.run, {len(values)} arguments)",
         per_call_us(lambda: fn.run(*args, grid=grid, warmup=False, **kwargs))),
        (f"{label}: binder + cache key only", per_call_us(binder_only)),
        (f"{label}: launcher only (compiled kernel, bound arguments)", per_call_us(launcher)),
    ]


def attnhub_replay_rows(label: str, offsets, q, k, v) -> list[tuple[str, float]]:
    """attnhub's own replay (backends/triton/replay.py) of the call's forward launch, and its
    parts: the launcher with the descriptors expanded by Triton (CUtensorMap encoded per
    call), and one CUtensorMap encoding."""
    from triton.backends.nvidia import driver as nvidia_driver

    from attnhub.backends.triton import forward, replay

    records = [r for _problem, entry in forward._replays._entries.values()
               for r in entry.values() if isinstance(r, forward.ForwardReplay)]
    if not records:
        return [(f"{label}: attnhub replay", float("nan"))]
    found = records[-1]
    problem = next(p for p, entry in forward._replays._entries.values() if found in
                   entry.values())
    _, inputs = attnhub.normalize(q, k, v, offsets, offsets,
                                  *((64, 64) if isinstance(offsets, torch.Tensor) else ()),
                                  causal=True)
    cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
    out = torch.empty_like(q)
    lse = torch.empty((problem.nheads, problem.total_q), device="cuda")
    rows = [(f"{label}: attnhub replay (ForwardReplay.launch, direct entry point: "
             f"{found.record._direct is not None})",
             per_call_us(lambda: found.launch(q, k, v, out, lse, cu_q, cu_k)))]
    record = found.record
    if record._direct is not None:
        rows.append((f"{label}: Triton's launcher (CudaLauncher, descriptors encoded per call)",
                     per_call_us(lambda: _triton_launcher(record, q, k, v, out, lse, cu_q,
                                                          cu_k, found.tma))))
    templates = [t for t in record._templates if t is not None]
    meta = getattr(record._kernel.metadata, "tensordesc_meta", None)
    if templates and meta:
        descs = [replay.rebased(t, x) for t, x in zip(templates, (q, k, v), strict=False)]
        rows.append((f"{label}: CUtensorMap encodings of the {len(descs)} descriptors",
                     per_call_us(lambda: [nvidia_driver.make_tensordesc_arg(d, m) for d, m in
                                          zip(descs, meta, strict=False)])))
    return rows


def _triton_launcher(record, q, k, v, out, lse, cu_q, cu_k, tma: bool) -> None:
    """The record replayed through Triton's own launcher (no direct entry point)."""
    direct, record._direct = record._direct, None
    try:
        record(q, k, v, out, lse, cu_q, cu_k, *((k, v) if tma else ()))
    finally:
        record._direct = direct


def backward_rows(q, k, v, cu, info, scale: float, calls: int) -> None:
    """Host time of a tiny forward+backward: the aten ops called in a row, the autograd
    engine alone, attnhub -> torch-flash and -> triton through torch.autograd.grad; then a
    cProfile of each attnhub path."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    dout = torch.randn_like(q)
    fwd = torch.ops.aten._flash_attention_forward
    bwd = torch.ops.aten._flash_attention_backward

    def aten():
        out, lse, seed, offset, _ = fwd(q, k, v, cu, cu, 64, 64, 0.0, True, False, scale=scale)
        return bwd(dout, q, k, v, out, lse, cu, cu, 64, 64, 0.0, True, seed, offset,
                   scale=scale)

    def engine():  # autograd's own cost over one cheap op per leaf
        out = leaves[0] * 2.0 + leaves[1].sum() + leaves[2].sum()
        return torch.autograd.grad(out, leaves, dout)

    def through(backend):
        def run():
            out = attnhub.attention_forward_varlen(*leaves, info, info, causal=True,
                                                   backend=backend)
            return torch.autograd.grad(out, leaves, dout)
        return run

    rows = [("aten forward + backward ops, no autograd", per_call_us(aten, calls // 4)),
            ("autograd engine over a cheap op (torch.autograd.grad)",
             per_call_us(engine, calls // 4)),
            ("attnhub -> torch-flash, forward + autograd.grad",
             per_call_us(through("torch-flash"), calls // 4)),
            ("attnhub -> triton, forward + autograd.grad",
             per_call_us(through("triton"), calls // 4))]
    print("\n## Forward + backward, inputs requiring grad\n")
    print("| path | us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    for backend in ("torch-flash", "triton"):
        fn = through(backend)
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(calls // 4):
            fn()
        prof.disable()
        torch.cuda.synchronize()
        print(f"\n## cProfile, attnhub -> {backend}, forward + backward\n")
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backward", action="store_true",
                        help="forward+backward rows (inputs requiring grad) and their cProfile")
    args = parser.parse_args()
    total = sum(LENGTHS)
    torch.manual_seed(0)
    q = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.arange(0, total + 1, 64, device="cuda", dtype=torch.int32)
    info = attnhub.VarlenInfo.from_lengths(LENGTHS, "cuda")
    scale = 128 ** -0.5

    def aten():
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, 64, 64, 0.0, True,
                                                       False, scale=scale)

    def call(offsets, backend):
        extra = (64, 64) if offsets is cu else ()
        return lambda: attnhub.attention_forward_varlen(q, k, v, offsets, offsets, *extra,
                                                        causal=True, backend=backend)

    rows = [("aten op (torch.ops.aten._flash_attention_forward)", per_call_us(aten)),
            ("attnhub -> torch-flash, device cu_seqlens", per_call_us(call(cu, "torch-flash"))),
            ("attnhub, automatic choice, device cu_seqlens", per_call_us(call(cu, None))),
            ("attnhub, automatic choice, VarlenInfo", per_call_us(call(info, None)))]
    from attnhub.backends.triton import forward

    for label, offsets in (("device cu_seqlens", cu), ("VarlenInfo", info)):
        fn = call(offsets, "triton")
        rows.append((f"attnhub -> triton, {label}", per_call_us(fn)))
        rows += attnhub_replay_rows(label, offsets, q, k, v)
        forward._replays.clear()  # the next call goes through Triton's own launch path
        with LaunchRecorder() as rec:
            fn()
        rows += replay_rows(label, rec.last)
        torch.cuda.synchronize()
    from attnhub.backends.triton import hopper_forward

    if hopper_forward.available():
        rows.append(("three Gluon TensorDescriptor objects (q, k, v)", per_call_us(
            lambda: [hopper_forward.descriptor(t, 128, 128) for t in (q, k, v)])))
    rows.append(("torch.empty of out and lse", per_call_us(
        lambda: (torch.empty_like(q), torch.empty((32, total), device="cuda")))))
    print(f"# Tiny-call host time on {torch.cuda.get_device_name()}: 8 x 64 tokens, bf16, "
          f"32/8 heads, d 128, causal (torch {torch.__version__})\n")
    print("| path | us per call |\n|---|---|")
    for name, us in rows:
        print(f"| {name} | {us:.1f} |")
    if args.backward:
        backward_rows(q, k, v, cu, info, scale, args.calls)
    if args.cprofile:
        for label, offsets in (("device cu_seqlens", cu), ("VarlenInfo", info)):
            fn = call(offsets, "triton")
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(args.calls):
                fn()
            prof.disable()
            torch.cuda.synchronize()
            print(f"\n## cProfile, attnhub -> triton, {label}\n")
            pstats.Stats(prof).sort_stats("tottime").print_stats(22)


if __name__ == "__main__":
    main()
