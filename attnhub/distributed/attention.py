"""context_parallel_attention: attention over a packed batch whose tokens are spread over the
ranks of a process group by a zigzag ContextShard."""

from __future__ import annotations

import torch

from ..errors import InvalidArgumentError
from ..features import check_sinks, softcap_argument, window_argument
from ..normalize import WindowSize, _scale
from .all_gather import AllGatherAttention
from .block_attention import AttentionOptions
from .ring import RingAttention
from .zigzag import ContextShard

STRATEGIES = ("auto", "ring", "all_gather")
# The auto rule's bound on the whole batch's K/V bytes (KV heads only): 64 MiB is 16k tokens
# at 8 KV heads of dim 128 in bf16, where one ring step's compute is too short to hide a
# transfer and one collective is cheaper than world - 1 ring steps.
ALL_GATHER_MAX_BYTES = 64 << 20


def choose_strategy(shard: ContextShard, k: torch.Tensor, strategy: str = "auto",
                    all_gather_max_bytes: int = ALL_GATHER_MAX_BYTES) -> str:
    """"ring" or "all_gather" for a call. "auto": all-gather when the whole batch's K and V
    (global tokens x nheads_k x head_dim x 2 x element size) fit in ``all_gather_max_bytes``,
    and the ring otherwise (and always with world size 1, where nothing moves)."""
    if strategy not in STRATEGIES:
        raise InvalidArgumentError("strategy", " or ".join(repr(s) for s in STRATEGIES),
                                   repr(strategy))
    if strategy != "auto":
        return strategy
    if shard.world_size == 1:
        return "ring"
    kv_bytes = 2 * shard.global_info.total * k.shape[1] * k.shape[2] * k.element_size()
    return "all_gather" if kv_bytes <= all_gather_max_bytes else "ring"


def context_parallel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shard: ContextShard,
    group: object | None = None,
    *,
    causal: bool = False,
    window_size: WindowSize = None,
    softcap: float | None = None,
    softmax_scale: float | None = None,
    deterministic: bool | None = None,
    sinks: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str | None = None,
    strategy: str = "auto",
    all_gather_max_bytes: int = ALL_GATHER_MAX_BYTES,
):
    """Self-attention over a packed batch sharded by ``shard`` across ``group`` (the default
    process group when None).

    q: (shard.total, nheads, head_dim), k / v: (shard.total, nheads_k, head_dim): this rank's
    rows, in the order ``shard.shard`` gives them. causal / window_size / softcap /
    softmax_scale / deterministic / sinks: as in attention_forward_varlen, applied to each
    whole sequence (global positions); sinks (float32 (nheads,)) join each row's softmax
    once, after the steps' results are merged (their gradient flows through lse, so the
    steps' backend must take a gradient of lse). backend: force the backend of every step.
    strategy: "ring", "all_gather" or "auto" (see choose_strategy).

    Returns out (q's shape and dtype), or (out, lse) with return_lse, lse float32
    (nheads, shard.total). Differentiable in q, k, v (and through lse where the backend takes
    a gradient of lse). Under torch.compile the call is a graph break (the collectives run
    eagerly); the model's other parts compile.
    """
    left, right = window_argument(window_size, causal)
    _check_group(group, shard)
    _check_shapes(q, k, v, shard)
    opts = AttentionOptions(
        scale=_scale(softmax_scale, q.shape[-1]), softcap=softcap_argument(softcap),
        deterministic=bool(torch.are_deterministic_algorithms_enabled()
                           if deterministic is None else deterministic),
        requires_grad=torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                                   or v.requires_grad),
        backend=backend)
    if sinks is not None:
        sinks = check_sinks(sinks, q.shape[1], q.device)
    chosen = choose_strategy(shard, k, strategy, all_gather_max_bytes)
    out, lse = _apply(chosen, q, k, v, shard, group, (left, right), opts)
    if sinks is not None:
        out, lse = add_sinks(out, lse, sinks)
    return (out, lse) if return_lse else out


def add_sinks(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Join each query head's sink logit to the softmax that produced (out, lse): out
    (total, nheads, head_dim), lse float32 (nheads, total) -> out scaled by
    exp(lse - lse'), lse' = logaddexp(lse, sinks[h]). Rows that saw no key (lse -inf) get
    out 0 and lse' = sink. Differentiable in out, lse and sinks."""
    merged = torch.logaddexp(lse, sinks[:, None])
    scale = torch.exp(lse - merged).transpose(0, 1)[..., None]
    wide = torch.promote_types(out.dtype, torch.float32)
    return (out.to(wide) * scale.to(wide)).to(out.dtype), merged


@torch.compiler.disable
def _apply(strategy: str, q, k, v, shard, group, window, opts):
    fn = RingAttention if strategy == "ring" else AllGatherAttention
    return fn.apply(q, k, v, shard, group, window, opts)


def _check_group(group: object | None, shard: ContextShard) -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        if shard.world_size == 1:
            return
        raise InvalidArgumentError("group", "an initialized torch.distributed process group",
                                   "none initialized")
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if (shard.world_size, shard.rank) != (world, rank):
        raise InvalidArgumentError(
            "shard", f"a shard for world size {world}, rank {rank} (the group's)",
            f"world size {shard.world_size}, rank {shard.rank}")


def _check_shapes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: ContextShard
                  ) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise InvalidArgumentError(name, "a 3-D tensor (shard.total, heads, head_dim)",
                                       getattr(t, "shape", type(t).__name__))
        if t.shape[0] != shard.total:
            raise InvalidArgumentError(name, f"{shard.total} rows (this rank's shard)",
                                       t.shape[0])
    if k.shape != v.shape:
        raise InvalidArgumentError("v", f"k's shape {tuple(k.shape)}", tuple(v.shape))
