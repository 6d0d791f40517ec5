"""Capabilities: what a backend computes, as data, and the reasons derived from it."""

from __future__ import annotations

import dataclasses

import torch

from .features import FEATURES, FLAGS
from .problem import VarlenProblem

_SHORT_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


class _Capabilities:
    """Declarative feature set: ``Capabilities(dtypes=..., <flag>=...)``, keywords only after
    ``dtypes``. ``head_dims`` a closed range; ``head_dim_multiple`` the granularity the kernels
    need; ``gqa`` nheads != nheads_k; ``backward`` gradients at all.

    The feature flags come from the feature table (attnhub.features): causal, window,
    softcap, alibi (the accepted slope shapes), page_size_multiple (None = no paged KV),
    dropout, deterministic_backward, top_left, return_probs, and the opt-in ones (False by
    default: a backend claims them explicitly) custom_mask / custom_mask_backward and
    sinks / sinks_backward (the ``*_backward`` flags matter only when the feature is claimed).
    """

    __slots__ = ()

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
        if p.requires_grad and not self.backward:
            out.append("backward (inputs require grad) is not implemented")
        for feature in FEATURES:
            out += feature.reasons(self, p)
        return out

    def summary(self) -> dict[str, str]:
        """Feature -> short text, for `attnhub info`'s capability table."""
        dt = ",".join(sorted(_SHORT_DTYPE.get(d, str(d)) for d in self.dtypes))
        lo, hi = self.head_dims
        hd = f"{lo}-{hi}" + (f" /{self.head_dim_multiple}" if self.head_dim_multiple > 1 else "")
        out = {
            "dtypes": dt,
            "head_dim": hd if hi < 1 << 16 else f">={lo}",
            "gqa": "yes" if self.gqa else "no",
            "backward": "yes" if self.backward else "no",
        }
        for feature in FEATURES:
            out.update((column, text(self)) for column, text in feature.columns)
        return out


# Built from the feature table, so that a feature's flags are declared once.
Capabilities = dataclasses.make_dataclass(
    "Capabilities",
    [("dtypes", "frozenset[torch.dtype]"),
     ("head_dims", "tuple[int, int]", dataclasses.field(default=(1, 1 << 16), kw_only=True)),
     ("head_dim_multiple", "int", dataclasses.field(default=1, kw_only=True)),
     ("gqa", "bool", dataclasses.field(default=True, kw_only=True)),
     ("backward", "bool", dataclasses.field(default=True, kw_only=True)),
     *((f.name, f.annotation, dataclasses.field(default=f.default, kw_only=True))
       for f in FLAGS)],
    bases=(_Capabilities,), frozen=True, namespace={"__doc__": _Capabilities.__doc__})
Capabilities.__module__ = __name__
