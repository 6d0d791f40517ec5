"""attnhub as a PyTorch flash attention implementation.

PyTorch's ``torch.nn.attention.register_flash_attention_impl(name, register_fn=...)`` lets a
library register kernels that replace its bundled FlashAttention-2 in the dispatcher once a
user opts in with ``torch.nn.attention.activate_flash_attention_impl(name)`` (undone by
``restore_flash_attention_impl()``); ``varlen_attn`` and the flash backend of
``scaled_dot_product_attention`` then run them. Importing this module registers attnhub under
the name ``"attnhub"`` (never activating it: the user opts in, as PyTorch asks of providers)::

    import torch.nn.attention as attention
    import attnhub.integrations.torch_flash  # registers "attnhub"
    attention.activate_flash_attention_impl("attnhub")

Activation overrides, through ``torch.library.Library("aten", "IMPL")``:

* on CUDA: ``aten::_flash_attention_forward`` / ``_backward`` (``varlen_attn``), their
  ``_no_dropout_inplace`` out variant where PyTorch has it (``varlen_attn_out``), and
  ``aten::_scaled_dot_product_flash_attention`` / ``_backward`` (SDPA's flash backend);
* on the CPU, where PyTorch has no kernel for them: ``_flash_attention_forward`` / ``_backward``
  (and the out variant), so ``varlen_attn`` runs on CPU tensors.

Each call is normalized and dispatched by attnhub (``ATTNHUB_BACKEND`` and
``attnhub.use_backend`` apply); backward runs on the backend that forward selects for the same
call. attnhub's own ``torch-flash`` backend calls the replaced aten ops: re-entered from inside
this implementation, they run PyTorch's original kernel (``torch.library.get_kernel``), so
nothing recurses. Not expressible through these ops, and raised with the reason: dropout
(PyTorch's ``rng_state`` contract carries its own Philox seed, attnhub's dropout draws its own
mask), ``seqused_k``, ``alibi_slopes`` (the backward schema has no slot for them).
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable
from typing import Any

import torch

from ..dispatch import select
from ..normalize import normalize
from ..varlen_info import VarlenInfo

NAME = "attnhub"

_state = threading.local()


def supported() -> bool:
    """Whether this torch has the flash attention implementation registry (and
    ``torch.library.get_kernel``, used to reach the original kernels)."""
    attention = torch.nn.attention
    return (hasattr(attention, "register_flash_attention_impl")
            and hasattr(attention, "activate_flash_attention_impl")
            and hasattr(torch.library, "get_kernel"))


def register(name: str = NAME) -> str:
    """Register attnhub in torch.nn.attention's flash attention registry under ``name``
    (activation stays the user's call). Returns ``name``."""
    if not supported():
        raise RuntimeError(
            f"torch {torch.__version__} has no torch.nn.attention.register_flash_attention_impl "
            "/ torch.library.get_kernel; attnhub's PyTorch flash hook needs a torch that has "
            "them (checked with torch 2.13)")
    torch.nn.attention.register_flash_attention_impl(name, register_fn=install)
    return name


class _Handle:
    """What activation returns to PyTorch's registry: ``remove()`` restores its kernels."""

    def __init__(self, library: torch.library.Library) -> None:
        self.library: torch.library.Library | None = library

    def remove(self) -> None:
        if self.library is not None:
            self.library._destroy()
            self.library = None


def install() -> _Handle:
    """Register attnhub's kernels over PyTorch's flash ops (the ``register_fn``; call
    ``torch.nn.attention.activate_flash_attention_impl`` rather than this)."""
    originals = {}
    for op in ("_flash_attention_forward", "_flash_attention_backward",
               "_flash_attention_forward_no_dropout_inplace"):
        if hasattr(torch.ops.aten, op):
            try:
                originals[op] = torch.library.get_kernel(f"aten::{op}", "CUDA")
            except RuntimeError:  # a torch built without CUDA
                originals[op] = None
    lib = torch.library.Library("aten", "IMPL")
    kernels: dict[str, Callable] = {
        "_flash_attention_forward": _varlen_forward,
        "_flash_attention_backward": _varlen_backward,
        "_flash_attention_forward_no_dropout_inplace": _varlen_forward_out,
    }
    for op, fn in kernels.items():
        if op not in originals:
            continue
        lib.impl(op, _reentrant(fn, originals[op]), "CUDA", with_keyset=True)
        lib.impl(op, _reentrant(fn, None), "CPU", with_keyset=True)
    lib.impl("_scaled_dot_product_flash_attention", _ignore_keyset(_sdpa_forward), "CUDA",
             with_keyset=True)
    lib.impl("_scaled_dot_product_flash_attention_backward", _ignore_keyset(_sdpa_backward),
             "CUDA", with_keyset=True)
    return _Handle(lib)


def _reentrant(fn: Callable, original: Any) -> Callable:
    """Run ``fn``; a call made while ``fn`` runs (attnhub's torch-flash backend calling the
    same aten op) goes to PyTorch's original kernel."""
    def kernel(keyset, *args, **kwargs):
        if getattr(_state, "inside", False) and original is not None:
            return original.call_boxed(keyset, *args, **kwargs)
        _state.inside = True
        try:
            return fn(*args, **kwargs)
        finally:
            _state.inside = False
    return kernel


def _ignore_keyset(fn: Callable) -> Callable:
    """Run ``fn`` marked as inside attnhub, with no original kernel to route re-entry to."""
    return _reentrant(fn, None)


def _decline(dropout_p: float, seqused_k: torch.Tensor | None = None,
             alibi_slopes: torch.Tensor | None = None) -> None:
    for name, value, why in (
            ("dropout_p", dropout_p > 0, "PyTorch's rng_state contract carries its own Philox "
             "seed; call attnhub.attention_forward_varlen(dropout_p=...) directly"),
            ("seqused_k", seqused_k is not None, "not an attnhub argument"),
            ("alibi_slopes", alibi_slopes is not None, "the aten backward has no slot for "
             "them; call attnhub.attention_forward_varlen(alibi_slopes=...) directly")):
        if value:
            raise NotImplementedError(f"attnhub flash attention impl: {name} is not supported "
                                      f"({why})")


def _layout(query: torch.Tensor, key: torch.Tensor, cum_seq_q: torch.Tensor | None,
            cum_seq_k: torch.Tensor | None):
    """Packed (total, heads, dim) views and offsets; dense (batch, len, heads, dim) inputs
    become uniform layouts."""
    if cum_seq_q is not None:
        return query, key, cum_seq_q, cum_seq_k, None
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    info_q = VarlenInfo.from_lengths([q_len] * batch, query.device)
    info_k = info_q if kv_len == q_len else VarlenInfo.from_lengths([kv_len] * batch,
                                                                     query.device)
    return (query.reshape(batch * q_len, *query.shape[2:]),
            key.reshape(batch * kv_len, *key.shape[2:]), info_q, info_k, (batch, q_len))


def _window(is_causal: bool, left: int | None, right: int | None) -> tuple[int, int]:
    left = -1 if left is None else int(left)
    right = 0 if is_causal else (-1 if right is None else int(right))
    return left, right


def _problem(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, window, alignment,
             block_table=None, requires_grad=False):
    problem, inputs = normalize(
        q, k, v, cu_q, cu_k, None if isinstance(cu_q, VarlenInfo) else int(max_q),
        None if isinstance(cu_k, VarlenInfo) else int(max_k), softmax_scale=scale,
        causal=is_causal, window_size=window, block_table=block_table,
        mask_alignment=alignment)
    if requires_grad:
        problem = dataclasses.replace(problem, requires_grad=True)
    return problem, inputs


def _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal, scale,
             window, alignment, block_table=None):
    """-> out (query's layout), lse ((heads, total_q), or (batch, heads, q_len) for dense)."""
    q, k, cu_q, cu_k, dense = _layout(query, key, cum_seq_q, cum_seq_k)
    v = value if dense is None else value.reshape(k.shape[0], *value.shape[2:])
    problem, inputs = _problem(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, window,
                               alignment, block_table)
    result = select(problem).forward(problem, inputs)
    out, lse = result.out, result.lse
    if dense is not None:
        batch, q_len = dense
        out = out.view(batch, q_len, *out.shape[1:])
        lse = lse.view(lse.shape[0], batch, q_len).transpose(0, 1)
    return out, lse


def _backward(grad_out, query, key, value, out, lse, cum_seq_q, cum_seq_k, max_q, max_k,
              is_causal, scale, window, alignment):
    q, k, cu_q, cu_k, dense = _layout(query, key, cum_seq_q, cum_seq_k)
    v = value if dense is None else value.reshape(k.shape[0], *value.shape[2:])
    if dense is not None:
        grad_out = grad_out.reshape(q.shape[0], *grad_out.shape[2:])
        out = out.reshape(q.shape[0], *out.shape[2:])
        lse = lse.transpose(0, 1).reshape(lse.shape[1], -1)
    problem, inputs = _problem(q, k, v, cu_q, cu_k, max_q, max_k, scale, is_causal, window,
                               alignment, requires_grad=True)
    backend = select(problem)
    grads = backend.backward(problem, inputs, out.contiguous(), lse.contiguous(),
                             grad_out.contiguous())
    dq, dk, dv = grads.dq, grads.dk, grads.dv
    if dense is not None:
        dq, dk, dv = (g.view(t.shape) for g, t in ((dq, query), (dk, key), (dv, value)))
    return dq, dk, dv


def _rng(query: torch.Tensor) -> torch.Tensor:
    return torch.zeros(2, dtype=torch.uint64, device=query.device)


def _varlen_forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                    is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                    window_size_right=None, seqused_k=None, alibi_slopes=None,
                    block_table=None, num_splits=None):
    _decline(dropout_p, seqused_k, alibi_slopes)
    out, lse = _forward(query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, is_causal,
                        scale, _window(is_causal, window_size_left, window_size_right),
                        "bottom_right", block_table)
    empty = query.new_empty(0)
    return out, lse, _rng(query), empty, empty


def _varlen_forward_out(out, query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p,
                        is_causal, return_debug_mask, *, scale=None, window_size_left=None,
                        window_size_right=None, seqused_k=None, alibi_slopes=None,
                        block_table=None, num_splits=None):
    result, lse, *_ = _varlen_forward(
        query, key, value, cum_seq_q, cum_seq_k, max_q, max_k, dropout_p, is_causal,
        return_debug_mask, scale=scale, window_size_left=window_size_left,
        window_size_right=window_size_right, seqused_k=seqused_k, alibi_slopes=alibi_slopes,
        block_table=block_table)
    out.copy_(result)
    return lse


def _varlen_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                     max_k, dropout_p, is_causal, rng_state, unused, *, scale=None,
                     window_size_left=None, window_size_right=None):
    _decline(dropout_p)
    return _backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                     max_k, is_causal, scale,
                     _window(is_causal, window_size_left, window_size_right), "bottom_right")


def _sdpa_forward(query, key, value, dropout_p=0.0, is_causal=False, return_debug_mask=False,
                  *, scale=None):
    """SDPA's flash entry: (batch, heads, len, dim) tensors; PyTorch routes only square
    causal calls here, where its top-left causal mask is attnhub's."""
    _decline(dropout_p)
    out, lse = _forward(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                        None, None, 0, 0, is_causal, scale, _window(is_causal, None, None),
                        "top_left")
    empty = query.new_empty(0)
    return (out.transpose(1, 2), lse, empty, empty, query.shape[2], key.shape[2], _rng(query),
            empty, empty)


def _sdpa_backward(grad_out, query, key, value, out, logsumexp, cum_seq_q, cum_seq_k, max_q,
                   max_k, dropout_p, is_causal, philox_seed, philox_offset, *, scale=None):
    _decline(dropout_p)
    dq, dk, dv = _backward(grad_out.transpose(1, 2), query.transpose(1, 2),
                           key.transpose(1, 2), value.transpose(1, 2), out.transpose(1, 2),
                           logsumexp, None, None, max_q, max_k, is_causal, scale,
                           _window(is_causal, None, None), "top_left")
    return dq.transpose(1, 2), dk.transpose(1, 2), dv.transpose(1, 2)


if supported():  # on an older torch importing stays harmless; register() says what is missing
    register()
