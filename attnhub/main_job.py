"""`attnhub run`: one packed batch through dispatch, checked against the reference, timed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

import torch

from .api import attention_forward_varlen
from .conformance.tolerance import Check, check
from .dispatch import select
from .normalize import normalize
from .varlen_info import VarlenInfo

# Mixed lengths, one empty sequence and one single token among them.
DEFAULT_LENGTHS = (384, 1, 77, 0, 256, 130, 511, 33)


@dataclass
class JobConfig:
    """The embedded default job; every field can be overridden from the command line."""

    lengths: tuple[int, ...] = DEFAULT_LENGTHS
    nheads: int = 8
    nheads_k: int = 2
    head_dim: int = 64
    causal: bool = True
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    dtype: str | None = None  # None: bfloat16 on an accelerator, float32 on the CPU
    device: str | None = None  # None: the best device here
    backend: str | None = None
    grad: bool = True
    repeats: int = 5
    seed: int = 0


@dataclass
class JobResult:
    device: str
    dtype: str
    backends: dict[str, str]  # "forward" / "forward+backward" -> the backend that ran
    tokens: int
    # out, lse (and dq, dk, dv with grad) under the conformance suite's pass rule
    checks: dict[str, Check] = field(default_factory=dict)
    times_ms: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return all(c.ok for c in self.checks.values())


def best_device() -> torch.device:
    """CUDA if present, then other accelerators torch knows, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    for name in ("npu", "xpu", "mps"):
        module = getattr(torch, name, None)
        try:
            if module is not None and module.is_available():
                return torch.device(name)
        except Exception:
            continue
    return torch.device("cpu")


def _sync(device: torch.device) -> None:
    module = getattr(torch, device.type, None)
    if device.type != "cpu" and module is not None and hasattr(module, "synchronize"):
        module.synchronize()


def _time_ms(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up: compilation, caches
    _sync(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def _grads(out: torch.Tensor, leaves: list[torch.Tensor], dout: torch.Tensor
           ) -> tuple[torch.Tensor, ...]:
    """Gradients of the scalar loss sum(out * dout): out's gradient is exactly dout. A scalar
    loss, as in training, rather than grad_outputs=dout: torch.autograd.grad imports sympy
    (about a second) the first time it checks a grad_outputs tensor's shape."""
    return torch.autograd.grad((out * dout).sum(), leaves)


def run_job(cfg: JobConfig) -> JobResult:
    """Run the configured batch through dispatch and through the reference in float64."""
    device = torch.device(cfg.device) if cfg.device else best_device()
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else (
        torch.float32 if device.type == "cpu" else torch.bfloat16)
    gen = torch.Generator().manual_seed(cfg.seed)
    info = VarlenInfo.from_lengths(cfg.lengths, device)
    total = info.total

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device, dtype)

    q = rand(total, cfg.nheads, cfg.head_dim)
    k = rand(total, cfg.nheads_k, cfg.head_dim)
    v = rand(total, cfg.nheads_k, cfg.head_dim)
    dout = rand(total, cfg.nheads, cfg.head_dim)
    kwargs = dict(causal=cfg.causal, window_size=cfg.window, softcap=cfg.softcap)
    backends = {"forward": select(normalize(q, k, v, info, info, **kwargs)[0],
                                  cfg.backend).name}

    def run(x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, name: str | None):
        return attention_forward_varlen(x, y, z, info, info, return_lse=True, backend=name,
                                        **kwargs)

    result = JobResult(device=str(device), dtype=str(dtype).removeprefix("torch."),
                       backends=backends, tokens=total)
    out, lse = run(q, k, v, cfg.backend)
    hi = [t.detach().to(torch.float64) for t in (q, k, v)]
    if cfg.grad:
        for t in hi:
            t.requires_grad_(True)
    ref_out, ref_lse = run(*hi, "reference")
    low = [t.detach() for t in (q, k, v)]
    low_out, low_lse = run(*low, "reference")  # the reference's own error in this dtype
    for name, got, oracle, reference in (("out", out, ref_out, low_out),
                                         ("lse", lse, ref_lse, low_lse)):
        result.checks[name] = check(name, got, oracle, reference, dtype)
    result.times_ms["forward"] = _time_ms(lambda: run(q, k, v, cfg.backend), device, cfg.repeats)

    if cfg.grad:
        ref_grads = _grads(ref_out, hi, dout.double())
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        backends["forward+backward"] = select(
            normalize(*leaves, info, info, **kwargs)[0], cfg.backend).name
        low_leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        grads = _grads(run(*leaves, cfg.backend)[0], leaves, dout)
        low_grads = _grads(run(*low_leaves, "reference")[0], low_leaves, dout)
        for name, g, lg, rg in zip(("dq", "dk", "dv"), grads, low_grads, ref_grads,
                                   strict=True):
            result.checks[name] = check(name, g, rg, lg, dtype)

        def fwd_bwd() -> None:
            _grads(run(*leaves, cfg.backend)[0], leaves, dout)

        result.times_ms["forward+backward"] = _time_ms(fwd_bwd, device, cfg.repeats)
    return result


def render(cfg: JobConfig, result: JobResult) -> str:
    lines = [
        f"attnhub run: {len(cfg.lengths)} sequences, {result.tokens} tokens, lengths "
        f"{list(cfg.lengths)}",
        f"  heads {cfg.nheads}/{cfg.nheads_k} (q/kv), head_dim {cfg.head_dim}, causal "
        f"{cfg.causal}, window {cfg.window or (-1, -1)}, softcap {cfg.softcap}",
        f"  device {result.device}, dtype {result.dtype}",
        "  backend: " + ", ".join(f"{v} ({k})" for k, v in result.backends.items()),
        "  max abs error vs the reference in float64 (the conformance pass rule: 2x the "
        "reference's own error in this dtype + a rounding slack):",
    ]
    for k, c in result.checks.items():
        verdict = "ok" if c.ok else f"FAIL: {c.failure}"
        lines.append(f"    {k:<4} {c.error:.3e}  (tolerance {c.tolerance:.3e})  {verdict}")
    for k, ms in result.times_ms.items():
        lines.append(f"  time {k}: {ms:.3f} ms (median of {cfg.repeats})")
    lines.append("PASS" if result.passed else "FAIL")
    return "\n".join(lines)
