"""``attn_implementation="attnhub"`` for Hugging Face transformers 5.x.

Importing this module registers attnhub in transformers' ``AttentionInterface`` (the attention
function) and ``AttentionMaskInterface`` (the mask it is given: the 2-D padding mask, as for
``flash_attention_2``); :func:`register` does the same explicitly, under any name::

    import attnhub.integrations.transformers  # registers "attnhub"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="attnhub")

Each call becomes one varlen call (:func:`attnhub.attention_forward_varlen`):

* padded batches (a 2-D ``attention_mask``) are unpadded with attnhub's ``bert_padding``
  helpers and the output padded back (padding rows are 0);
* padding-free packed batches go to varlen without padding work: ``cu_seq_lens_q`` /
  ``cu_seq_lens_k`` kwargs (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``),
  or ``position_ids`` restarting (a sequence starts wherever the position does not grow by
  1, the rule transformers' sdpa/eager masks use);
* otherwise every row is one sequence (decoding with a KV cache included: the causal mask is
  bottom-right aligned).

The layout of a forward pass is computed once (one host read-back of the mask, position ids
or cu_seqlens) and reused by every layer. The module's ``scaling``, ``dropout`` (training
only: the models pass 0 in eval), ``sliding_window`` (``w`` tokens including the query: a
left window of ``w - 1``, symmetric for bidirectional layers), ``softcap`` and causality
(``is_causal`` kwarg, else ``module.is_causal``) are passed on; GQA is native. What attnhub
cannot compute raises :class:`attnhub.InvalidArgumentError` naming the feature.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch

from ..api import attention_forward_varlen
from ..errors import InvalidArgumentError
from ..flash_attn.bert_padding import index_first_axis, pad_input
from ..varlen_info import VarlenInfo

NAME = "attnhub"


def register(name: str = NAME) -> str:
    """Register attnhub's attention and mask functions in transformers under ``name``.

    Returns ``name``, for ``from_pretrained(..., attn_implementation=register())``.
    Idempotent; raises ImportError when transformers (>= 5) is not installed.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, attention_forward)
    AttentionMaskInterface.register(name, padding_mask)
    return name


# The pieces of transformers' mask functions (masking_utils) that attnhub recomputes itself:
# causal or bidirectional, the sliding window (from the layer's sliding_window argument),
# packed sequences (from position_ids / cu_seq_lens), joined by and_masks.
_KNOWN_MASK_PIECES = (
    "and_masks.", "causal_mask_function", "bidirectional_mask_function",
    "sliding_window_overlay.", "sliding_window_bidirectional_overlay.",
    "sliding_window_causal_mask_function", "sliding_window_bidirectional_mask_function",
    "packed_sequence_mask_function.", "remap_positions_for_packed_sequence.",
)


def _unknown_mask_pieces(fn: Callable, seen: set[int] | None = None) -> list[str]:
    """Names of the pieces of a transformers mask function that attnhub does not compute
    (or_masks overlays, chunked attention, custom functions), found through its closures."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    name = getattr(fn, "__qualname__", type(fn).__name__)
    if not name.startswith(_KNOWN_MASK_PIECES):
        return [name]
    unknown = []
    for cell in getattr(fn, "__closure__", None) or ():
        value = cell.cell_contents
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if callable(item) and not isinstance(item, torch.Tensor):
                unknown += _unknown_mask_pieces(item, seen)
    return unknown


def padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0,
                 kv_offset: int = 0, mask_function: Callable | None = None,
                 attention_mask: torch.Tensor | None = None, **kwargs: Any
                 ) -> torch.Tensor | None:
    """transformers' mask hook: the 2-D (batch, kv_length) bool padding mask, or None when
    nothing is padded. Causal, sliding-window and packed-sequence masking are recomputed by
    attnhub from the call's arguments; a model whose mask function holds anything else (an
    or_masks overlay such as bidirectional image-token blocks, chunked attention, a custom
    function) raises, since that pattern would be lost."""
    unknown = _unknown_mask_pieces(mask_function) if mask_function is not None else []
    if unknown:
        raise InvalidArgumentError(
            "attn_implementation", "a model whose attention masks are padding, packing, causal "
            "and sliding-window masks only (attnhub cannot express the mask pattern "
            f"{', '.join(unknown)} of this model); use attn_implementation='sdpa' for it",
            "attnhub")
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:]
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


class _Layout:
    """One forward pass's packed layout: query/key VarlenInfo, and the indices of the kept
    tokens in the flattened (batch * length) rows when the batch was padded."""

    __slots__ = ("indices_k", "indices_q", "info_k", "info_q")

    def __init__(self, info_q: VarlenInfo, info_k: VarlenInfo,
                 indices_q: torch.Tensor | None = None,
                 indices_k: torch.Tensor | None = None) -> None:
        self.info_q, self.info_k = info_q, info_k
        self.indices_q, self.indices_k = indices_q, indices_k


class _PerForwardCache:
    """Layouts keyed by the identity (and version) of the tensor they were read from: every
    layer of a forward pass gets the same mask / position_ids / cu_seqlens tensor, so the
    read-back happens once per pass. Weak references: nothing outlives its tensor."""

    def __init__(self, size: int = 8) -> None:
        self._entries: list[tuple[weakref.ref, int, tuple, _Layout]] = []
        self._size = size

    def get(self, tensor: torch.Tensor, extra: tuple, build: Callable[[], _Layout]) -> _Layout:
        if torch.compiler.is_compiling():
            return build()
        for ref, version, key, layout in self._entries:
            if ref() is tensor and version == tensor._version and key == extra:
                return layout
        layout = build()
        self._entries = [e for e in self._entries if e[0]() is not None][-(self._size - 1):]
        self._entries.append((weakref.ref(tensor), tensor._version, extra, layout))
        return layout


_cache = _PerForwardCache()


def _uniform(batch: int, q_len: int, kv_len: int, device: torch.device) -> _Layout:
    """Every row one sequence: host-only layout, no read-back."""
    info_q = VarlenInfo.from_lengths([q_len] * batch, device)
    info_k = info_q if kv_len == q_len else VarlenInfo.from_lengths([kv_len] * batch, device)
    return _Layout(info_q, info_k)


def _from_padding(mask: torch.Tensor, q_len: int, device: torch.device) -> _Layout:
    """2-D padding mask (batch, kv_len), 1 = token. Queries are the mask's last q_len columns
    (a KV cache holds the rest), as in transformers' flash_attention_2 path."""
    mask = mask.to(device=device, dtype=torch.bool)
    kv_lengths = mask.sum(dim=-1)
    indices_k = torch.nonzero(mask.flatten()).flatten()
    info_k = VarlenInfo.from_lengths(kv_lengths.cpu(), device)
    if q_len == mask.shape[1]:
        return _Layout(info_k, info_k, indices_k, indices_k)
    q_mask = mask[:, -q_len:]
    indices_q = torch.nonzero(q_mask.flatten()).flatten()
    info_q = VarlenInfo.from_lengths(q_mask.sum(dim=-1).cpu(), device)
    return _Layout(info_q, info_k, indices_q, indices_k)


def _from_position_ids(position_ids: torch.Tensor, device: torch.device) -> _Layout:
    """(batch, length) position ids: a sequence starts at each row start and wherever the
    position does not grow by exactly 1 (transformers' packed-sequence rule)."""
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    offsets = torch.nonzero(starts.flatten()).flatten().tolist()
    info = VarlenInfo([*offsets, batch * length], device)
    return _Layout(info, info)


def _layout(query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None,
            position_ids: torch.Tensor | None, cu_q: torch.Tensor | None,
            cu_k: torch.Tensor | None) -> _Layout:
    batch, q_len, kv_len = query.shape[0], query.shape[1], key.shape[1]
    device = query.device
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise InvalidArgumentError(
                "attention_mask", "a 2-D (batch, seq_len) padding mask (attnhub computes "
                "causal and window masks itself; a 4-D mask cannot be honoured)",
                f"{attention_mask.dim()}-D {tuple(attention_mask.shape)}")
        if attention_mask.shape[1] != kv_len:
            raise InvalidArgumentError(
                "attention_mask", f"{kv_len} columns (the key length; a static cache larger "
                "than the mask is not supported)", tuple(attention_mask.shape))
        return _cache.get(attention_mask, (q_len, str(device)),
                          lambda: _from_padding(attention_mask, q_len, device))
    if cu_q is not None or cu_k is not None:
        if cu_q is None or cu_k is None:
            raise InvalidArgumentError("cu_seq_lens_q / cu_seq_lens_k", "both or neither",
                                       "only one")
        def build() -> _Layout:
            info_q = VarlenInfo.from_cu_seqlens(cu_q, device)
            info_k = info_q if cu_k is cu_q else VarlenInfo.from_cu_seqlens(cu_k, device)
            return _Layout(info_q, info_k)
        for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
            if cu.dim() != 1:
                raise InvalidArgumentError(name, "a 1-D tensor (batch + 1,)", tuple(cu.shape))
        layout = _cache.get(cu_q, (id(cu_k), str(device)), build)
        for name, info, total in (("cu_seq_lens_q", layout.info_q, batch * q_len),
                                  ("cu_seq_lens_k", layout.info_k, batch * kv_len)):
            if info.total != total:
                raise InvalidArgumentError(name, f"a last offset equal to the {total} packed "
                                           "tokens of the batch", info.total)
        return layout
    if position_ids is not None and position_ids.dim() == 2 and q_len == kv_len and q_len > 1:
        ids = position_ids  # the cache key: the tensor every layer receives
        return _cache.get(ids, (batch, str(device)),
                          lambda: _from_position_ids(ids.expand(batch, -1), device))
    return _uniform(batch, q_len, kv_len, device)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                      value: torch.Tensor, attention_mask: torch.Tensor | None,
                      dropout: float = 0.0, scaling: float | None = None,
                      sliding_window: int | None = None, softcap: float | None = None,
                      is_causal: bool | None = None, s_aux: torch.Tensor | None = None,
                      **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention hook. query (batch, nheads, q_len, head_dim); key, value
    (batch, nheads_k, kv_len, head_dim); attention_mask None or (batch, kv_len) bool from
    :func:`padding_mask`. s_aux: attention sinks, one logit per query head (nheads,), as
    gpt-oss passes them. Returns (out (batch, q_len, nheads, head_dim), None)."""
    if kwargs.get("output_attentions"):
        raise InvalidArgumentError("output_attentions", "False (attnhub never materialises "
                                   "attention weights; use attn_implementation='eager')", True)
    if kwargs.get("block_table") is not None:
        raise InvalidArgumentError("block_table", "None (transformers' paged continuous "
                                   "batching cache is not supported by this integration)",
                                   "a tensor")
    causal = bool(module.is_causal if is_causal is None else is_causal)
    window = None
    if sliding_window is not None:
        if sliding_window < 1:
            raise InvalidArgumentError("sliding_window", "a positive number of tokens",
                                       sliding_window)
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    batch, nheads, q_len, head_dim = query.shape
    q = query.transpose(1, 2)
    k = key.transpose(1, 2)
    v = value.transpose(1, 2)
    layout = _layout(q, k, attention_mask, kwargs.get("position_ids"),
                     kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"))
    q = q.reshape(-1, nheads, head_dim)
    k = k.reshape(-1, *k.shape[2:])
    v = v.reshape(-1, *v.shape[2:])
    if layout.indices_k is not None:
        q = index_first_axis(q, layout.indices_q)
        k = index_first_axis(k, layout.indices_k)
        v = index_first_axis(v, layout.indices_k)
    out = attention_forward_varlen(
        q, k, v, layout.info_q, layout.info_k, dropout_p=float(dropout), softmax_scale=scaling,
        causal=causal, window_size=window, softcap=softcap or None,
        deterministic=kwargs.get("deterministic"),
        # gpt-oss's learned sinks (one logit per query head, in the model's dtype): the same
        # math as attnhub's sinks, which take float32; the cast passes the gradient back.
        sinks=None if s_aux is None else s_aux.float())
    if layout.indices_q is not None:
        return pad_input(out, layout.indices_q, batch, q_len), None
    return out.view(batch, q_len, *out.shape[1:]), None


register()
