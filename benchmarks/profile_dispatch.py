"""Host cost of each step of attnhub's dispatch fast path, on the GPU machine's CPU.

Times the steps in isolation (the kernel replaced by a function returning a cached result),
so the figures are host time even where a loop of real calls is GPU-bound.

    python benchmarks/profile_dispatch.py
"""

from __future__ import annotations

import time

import torch

import attnhub
from attnhub import dispatch, plans
from attnhub.backends.cuda import torch_flash


def per_call_us(fn, n: int = 20000) -> float:
    for _ in range(500):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    dev = "cuda"
    lengths = [64] * 8
    q = torch.randn(512, 32, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(512, 8, 128, device=dev, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device=dev,
                      dtype=torch.int32)
    scale = 128 ** -0.5
    real = torch_flash.aten_forward
    cached = real(q, k, v, cu, cu, 64, 64, 0.0, True, False, scale=scale)

    def call():
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, 64, 64, causal=True,
                                                backend="torch-flash")

    call()
    key = plans.call_key(q, k, v, cu, cu, 64, 64, 0.0, None, True, None, None, None,
                         "torch-flash", "bottom_right", dispatch.forced_context())
    plan = plans.get(key)
    rows = [
        ("aten op, real kernel (host loop)", per_call_us(
            lambda: real(q, k, v, cu, cu, 64, 64, 0.0, True, False, scale=scale))),
        ("plans.call_key", per_call_us(lambda: plans.call_key(
            q, k, v, cu, cu, 64, 64, 0.0, None, True, None, None, None, "torch-flash",
            "bottom_right", dispatch.forced_context()))),
        ("q/k/v shape, dtype, device, requires_grad", per_call_us(lambda: (
            q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            q.requires_grad or k.requires_grad or v.requires_grad))),
        ("plans.get", per_call_us(lambda: plans.get(key))),
        ("plan.inputs", per_call_us(lambda: plan.inputs(q, k, v, cu, cu))),
    ]
    inputs = plan.inputs(q, k, v, cu, cu)
    torch_flash.aten_forward = lambda *a, **kw: cached
    plans.clear()  # plans bind the kernel when made: make them again around the stub
    try:
        rows.append(("backend.forward_out, kernel stubbed", per_call_us(
            lambda: plan.backend.forward_out(plan.problem, inputs))))
        rows.append(("attention_forward_varlen, kernel stubbed", per_call_us(call)))
    finally:
        torch_flash.aten_forward = real
        plans.clear()
    rows.append(("attention_forward_varlen, real kernel (host loop)", per_call_us(call)))
    torch.cuda.synchronize()
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for name, us in rows:
        print(f"{name:55s} {us:7.2f} us")


if __name__ == "__main__":
    main()
