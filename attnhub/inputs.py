"""VarlenInputs: the tensors of one normalized call, as backends receive them."""

from __future__ import annotations

import dataclasses

from .features import TENSORS

_DOC = """Tensors of one call, all on q's device.

q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim), or page pools
(num_pages, page_size, nheads_k, head_dim) with ``block_table`` (batch, max_pages) int32.
cu_seqlens_q / cu_seqlens_k: (batch + 1,) int32 offsets. The features' tensors (each None
when the call does not use the feature; attnhub.features declares them): alibi_slopes:
float32, (nheads,) or (batch, nheads). block_table: int32 (batch, max_pages). rng_state:
dropout state; in backward, the rng_state that the same backend's forward returned; in
forward, None (the backend draws from torch's generator) or, for the reference backend, a
fixed int64 (2,) seed pair. custom_mask / custom_mask_offsets: the bit-packed per-request
mask (uint8, little bit order) and the int64 (batch,) bit offset of each request's (sq, sk)
block (attnhub.custom_mask). sinks: float32 (nheads,), contiguous, one logit per query head.
schedule: what the backend's ``prepare`` returned for this layout (a plan's precomputed
launch metadata), or None.
"""

# Built from the feature table, so that a feature's tensors are declared once (fields in
# order: q, k, v, cu_seqlens_q, cu_seqlens_k, the features' tensors, schedule).
VarlenInputs = dataclasses.make_dataclass(
    "VarlenInputs",
    [("q", "torch.Tensor"), ("k", "torch.Tensor"), ("v", "torch.Tensor"),
     ("cu_seqlens_q", "torch.Tensor"), ("cu_seqlens_k", "torch.Tensor"),
     *((t.name, "torch.Tensor | None", dataclasses.field(default=None)) for t in TENSORS),
     ("schedule", "object | None", dataclasses.field(default=None))],
    slots=True, namespace={"__doc__": _DOC})
VarlenInputs.__module__ = __name__
