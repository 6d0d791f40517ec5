"""Capabilities: what a backend computes, as data, and the reasons derived from it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .problem import VarlenProblem

_SHORT_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


@dataclass(frozen=True)
class Capabilities:
    """Declarative feature set. ``page_size_multiple`` None = no paged KV; ``head_dims`` a
    closed range; ``head_dim_multiple`` the granularity the kernels need. ``custom_mask`` is
    opt-in (False by default): a backend claims per-request boolean masks explicitly;
    ``custom_mask_backward`` says whether its backward takes them too."""

    dtypes: frozenset[torch.dtype]
    head_dims: tuple[int, int] = (1, 1 << 16)
    head_dim_multiple: int = 1
    gqa: bool = True
    causal: bool = True
    window: bool = True
    softcap: bool = True
    alibi: frozenset[str] = frozenset({"head", "batch_head"})
    dropout: bool = True
    page_size_multiple: int | None = 1
    backward: bool = True
    deterministic_backward: bool = True
    top_left: bool = True
    return_probs: bool = True
    custom_mask: bool = False
    custom_mask_backward: bool = True

    def reasons(self, p: VarlenProblem) -> list[str]:
        """Plain sentences for every feature of ``p`` outside this set."""
        out: list[str] = []
        if p.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            out.append(f"dtype {str(p.dtype).removeprefix('torch.')} is not supported "
                       f"(supported: {names})")
        lo, hi = self.head_dims
        if not lo <= p.head_dim <= hi or p.head_dim % self.head_dim_multiple:
            extra = f" and a multiple of {self.head_dim_multiple}" if self.head_dim_multiple > 1 \
                else ""
            out.append(f"head_dim {p.head_dim} is not supported (needs {lo}..{hi}{extra})")
        if not self.gqa and p.nheads != p.nheads_k:
            out.append(f"grouped-query attention (nheads {p.nheads} != nheads_k {p.nheads_k}) "
                       "is not supported")
        if not self.causal and p.causal:
            out.append("causal masking is not supported")
        if not self.window and p.has_window:
            out.append(f"sliding window {p.window} is not supported")
        if not self.softcap and p.softcap > 0:
            out.append(f"softcap ({p.softcap}) is not supported")
        if p.alibi is not None and p.alibi not in self.alibi:
            shape = "(nheads,)" if p.alibi == "head" else "(batch, nheads)"
            out.append(f"ALiBi slopes of shape {shape} are not supported")
        if not self.dropout and p.dropout_p > 0:
            out.append(f"dropout (p = {p.dropout_p}) is not supported")
        if p.paged is not None:
            m = self.page_size_multiple
            if m is None:
                out.append("paged KV (block_table) is not supported")
            elif p.paged.page_size % m:
                out.append(f"paged KV with page_size {p.paged.page_size} is not supported "
                           f"(needs a multiple of {m})")
        if p.requires_grad and not self.backward:
            out.append("backward (inputs require grad) is not implemented")
        if p.requires_grad and p.deterministic and not self.deterministic_backward:
            out.append("a deterministic backward is not available")
        if not self.top_left and p.mask_alignment == "top_left":
            out.append("top-left mask alignment (Paddle's convention) is not supported")
        if not self.return_probs and p.return_probs:
            out.append("return_attn_probs is not supported")
        if p.custom_mask and not self.custom_mask:
            out.append("custom masks (a per-request boolean mask) are not supported")
        elif p.custom_mask and p.requires_grad and not self.custom_mask_backward:
            out.append("backward with a custom mask is not implemented")
        return out

    def summary(self) -> dict[str, str]:
        """Feature -> short text, for `attnhub info`'s capability table."""
        dt = ",".join(sorted(_SHORT_DTYPE.get(d, str(d)) for d in self.dtypes))
        lo, hi = self.head_dims
        hd = f"{lo}-{hi}" + (f" /{self.head_dim_multiple}" if self.head_dim_multiple > 1 else "")
        yes = {True: "yes", False: "no"}
        paged = "no" if self.page_size_multiple is None else (
            "yes" if self.page_size_multiple == 1 else f"page%{self.page_size_multiple}")
        return {
            "dtypes": dt,
            "head_dim": hd if hi < 1 << 16 else f">={lo}",
            "gqa": yes[self.gqa],
            "causal": yes[self.causal],
            "window": yes[self.window],
            "softcap": yes[self.softcap],
            "alibi": "/".join(sorted(self.alibi)) or "no",
            "dropout": yes[self.dropout],
            "paged": paged,
            "backward": yes[self.backward],
            "determ.": yes[self.deterministic_backward],
            "top_left": yes[self.top_left],
            "probs": yes[self.return_probs],
            "mask": ("fwd" if not self.custom_mask_backward else "yes") if self.custom_mask
            else "no",
        }
