"""Context parallelism: attention over a packed batch whose sequences are split across the
ranks of a torch.distributed process group (NCCL on GPUs, gloo on CPUs), every step
computed by attnhub's dispatch. See docs/context-parallel.md.

* :func:`zigzag_shard` / :class:`ContextShard`: the load-balanced split of each sequence
  into 2 x world chunks (rank r holds chunks r and 2 x world - 1 - r), local cu_seqlens,
  positions, and the way back to the global order;
* :func:`context_parallel_attention`: ring (or all-gather) attention over the shard, exact
  through lse merging, with backward.
"""

from .attention import ALL_GATHER_MAX_BYTES, choose_strategy, context_parallel_attention
from .zigzag import ContextShard, chunk_bounds, zigzag_shard

__all__ = [
    "ALL_GATHER_MAX_BYTES",
    "ContextShard",
    "choose_strategy",
    "chunk_bounds",
    "context_parallel_attention",
    "zigzag_shard",
]
