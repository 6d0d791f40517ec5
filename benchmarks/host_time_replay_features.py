"""Host time per call of tiny Triton calls with ALiBi slopes or sinks, with the launch replay
of such calls (backends/triton/replay.py ``FEATURES``) off and on, on the GPU machine.

    python benchmarks/host_time_replay_features.py

The call: 8 sequences of 64 tokens, GQA 32/8, head dim 128, bf16, causal, ``backend="triton"``;
forward, and forward+backward (``torch.autograd.grad`` of q, k, v). Each figure is
``attnhub.timing.host_time_us`` (100 calls per round, best of 7 rounds), microseconds per call,
after three warm-up calls that record the launches.
"""

from __future__ import annotations

import torch

import attnhub
from attnhub import plans
from attnhub.backends.triton import backward as triton_backward
from attnhub.backends.triton import forward as triton_forward
from attnhub.backends.triton import replay
from attnhub.timing import host_time_us


def main() -> None:
    dev = torch.device("cuda")
    info = attnhub.VarlenInfo.from_lengths([64] * 8, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(512, 32, 128, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(512, 8, 128, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(512, 8, 128, device=dev, dtype=torch.bfloat16, generator=g)
    features = {"plain": {}, "alibi": {"alibi_slopes": torch.rand(32, device=dev, generator=g)},
                "sinks": {"sinks": torch.randn(32, device=dev, generator=g)}}
    dout = torch.randn(512, 32, 128, device=dev, dtype=torch.bfloat16, generator=g)
    shipped = replay.FEATURES
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| call | mode | FEATURES off (us) | FEATURES on (us) |\n|---|---|---|---|")
    try:
        for name, kw in features.items():
            for backward in (False, True):
                leaves = [t.detach().requires_grad_(backward) for t in (q, k, v)]

                def call(leaves=leaves, kw=kw, backward=backward):
                    out = attnhub.attention_forward_varlen(*leaves, info, info, causal=True,
                                                           backend="triton", **kw)
                    if backward:
                        torch.autograd.grad(out, leaves, dout)

                times = []
                for on in (False, True):
                    replay.FEATURES = on
                    plans.clear()
                    triton_forward._replays.clear()
                    triton_backward._replays.clear()
                    for _ in range(3):
                        call()
                    times.append(host_time_us(call, dev, calls=100, rounds=7))
                mode = "fwd+bwd" if backward else "fwd"
                print(f"| {name} | {mode} | {times[0]:.1f} | {times[1]:.1f} |", flush=True)
    finally:
        replay.FEATURES = shipped


if __name__ == "__main__":
    main()
