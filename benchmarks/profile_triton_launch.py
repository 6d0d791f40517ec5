"""Where the host time of a tiny Triton call goes (cProfile over a loop of calls on the GPU
machine): attnhub's dispatch, the backend's launch preparation, Triton's launcher.

    python benchmarks/profile_triton_launch.py [--device-offsets]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

import attnhub


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device-offsets", action="store_true",
                        help="pass cu_seqlens tensors and max_seqlen (no host lengths)")
    parser.add_argument("--calls", type=int, default=2000)
    args = parser.parse_args()
    lengths = [64] * 8
    total = sum(lengths)
    q = torch.randn(total, 32, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(total, 8, 128, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    if args.device_offsets:
        cu = torch.arange(0, total + 1, 64, device="cuda", dtype=torch.int32)
        call_args = (cu, cu, 64, 64)
    else:
        info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
        call_args = (info, info)

    def call():
        return attnhub.attention_forward_varlen(q, k, v, *call_args, causal=True,
                                                backend="triton")

    for _ in range(200):
        call()
    torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.calls):
        call()
    prof.disable()
    torch.cuda.synchronize()
    stats = pstats.Stats(prof)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumtime").print_stats(30)


if __name__ == "__main__":
    main()
