"""attnhub's problem -> the exact keyword arguments of npu_fusion_attention(_grad), TND.

Mapping (Ascend's documentation, torch_npu 2.14.0, cited in docs/npu.md):

* no mask (window (-1, -1)): sparse_mode 0 and no atten_mask (pre/next are then ignored);
* causal, unbounded left: sparse_mode 3 (rightDownCausal) with the compressed mask;
* any other window (left, right), bottom-right aligned: sparse_mode 4 (band) with the
  compressed mask, pre_tockens = left and next_tockens = right (2**31 - 1 where unbounded;
  causal has right = 0);
* scale always passed (the operator's default is 1.0); keep_prob = 1 - dropout_p;
* inner_precise 0: rows that see no key are never passed (layout.py), so no mask row is all
  masked;
* actual_seq_qlen / actual_seq_kvlen: Python int lists of END offsets of one OperatorCall
  (layout.py), or for the v3 operators int64 device tensors ``cu_seqlens[1:]``;
* ALiBi: npu_fusion_attention_v2 / _grad_v2, whose pse_type 2 generates
  ``-slope[h] * |j + kv_start_idx - i - q_start_idx|`` from float32 slopes added after the
  scale; every sequence of one call has the same shift ``sk - sq``, passed as
  ``q_start_idx = [sk - sq]`` (queries are the last sq rows of a sequence of sk) or
  ``kv_start_idx = [sq - sk]`` (keys are the last sk of sq), which is attnhub's bottom-right
  ``|i + sk - sq - j|``; pse = the slopes, (nheads,) as given or (batch, nheads) restricted to
  the call's sequences; v2 names the band arguments pre_tokens / next_tokens;
* attention sinks: ``sink`` = attnhub's sinks, float32 (nheads,), to every forward and grad
  operator (v1, v2, v3 all take it): the same math ("m = max(sink, max(S)), Attention =
  e^{S-m}*V / (sum(e^{S-m}) + e^{sink-m})", the raw sink joining the scaled scores), so
  softmax_max / softmax_sum include it and each grad operator returns dsink (nheads,) as its
  last output. Passed only with sinks: older torch_npu releases have no ``sink`` parameter.
"""

from __future__ import annotations

import inspect

import torch

from attnhub.problem import VarlenProblem

from .layout import OperatorCall

INT32_MAX = 2**31 - 1
COMPRESSED_MASK_SIZE = 2048
SPARSE_NONE, SPARSE_CAUSAL, SPARSE_BAND = 0, 3, 4
PSE_GENERATED_ALIBI = 2  # pse_type: the operator generates -slope * |i - j|, mul then add
V1 = ("npu_fusion_attention", "npu_fusion_attention_grad")
V2 = ("npu_fusion_attention_v2", "npu_fusion_attention_grad_v2")
V3 = ("npu_fusion_attention_v3", "npu_fusion_attention_grad_v3")

_masks: dict[torch.device, torch.Tensor] = {}


def compressed_mask(device: torch.device) -> torch.Tensor:
    """triu(ones(2048, 2048), 1) as bool on ``device`` (True = masked), built once per device."""
    mask = _masks.get(device)
    if mask is None:
        ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool,
                          device=device)
        mask = _masks[device] = torch.triu(ones, diagonal=1)
    return mask


def mask_arguments(problem: VarlenProblem) -> tuple[int, int, int, bool]:
    """(sparse_mode, pre_tockens, next_tockens, needs the compressed mask)."""
    left, right = problem.window
    if left < 0 and right < 0:
        return SPARSE_NONE, INT32_MAX, INT32_MAX, False
    if right == 0 and left < 0:
        return SPARSE_CAUSAL, INT32_MAX, INT32_MAX, True
    return (SPARSE_BAND, left if left >= 0 else INT32_MAX, right if right >= 0 else INT32_MAX,
            True)


def _shared(problem: VarlenProblem, device: torch.device, seq_qlen, seq_kvlen) -> dict:
    sparse_mode, pre, nxt, needs_mask = mask_arguments(problem)
    return {
        "head_num": problem.nheads,
        "input_layout": "TND",
        "pse": None,
        "padding_mask": None,
        "atten_mask": compressed_mask(device) if needs_mask else None,
        "keep_prob": 1.0 - problem.dropout_p,
        "pre_tockens": pre,
        "next_tockens": nxt,
        "inner_precise": 0,
        "prefix": None,
        "actual_seq_qlen": seq_qlen,
        "actual_seq_kvlen": seq_kvlen,
        "sparse_mode": sparse_mode,
    }


def sink_kwargs(sinks: torch.Tensor | None) -> dict:
    """``{"sink": sinks}`` with sinks (float32 (nheads,)), else nothing (releases without
    the parameter keep working)."""
    return {} if sinks is None else {"sink": sinks}


def takes_argument(operator: object, argument: str) -> bool:
    """Whether a torch_npu operator (a torch.ops packet; the simulator's Python function) has
    a parameter named ``argument``. Unknown (no schema, no signature, or ``**kwargs``): True,
    and the call itself tells."""
    overloads = getattr(operator, "overloads", None)
    if callable(overloads):  # torch.ops.<namespace>.<name>: any overload's schema
        return any(a.name == argument for name in overloads()
                   for a in getattr(operator, name)._schema.arguments)
    try:
        parameters = inspect.signature(operator).parameters
    except (TypeError, ValueError):
        return True
    return argument in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def common_kwargs(problem: VarlenProblem, call: OperatorCall, device: torch.device) -> dict:
    """The arguments forward and backward share (everything but tensors and statistics)."""
    return _shared(problem, device, list(call.actual_seq_qlen), list(call.actual_seq_kvlen))


def operators(problem: VarlenProblem, device_lengths: bool = False) -> tuple[str, str]:
    """Names of the (forward, backward) torch_npu functions: the v2 pair for ALiBi (only v2
    takes pse_type), the v3 pair for lengths given as device tensors, else
    npu_fusion_attention / npu_fusion_attention_grad."""
    if problem.alibi is not None:
        return V2
    return V3 if device_lengths else V1


# Why a length constraint can still fail at run time, and what the caller can do.
UNKNOWN_LENGTHS_HINT = ("; these lengths were not known when the backend was chosen "
                        "(device offsets with max_seqlen): pass a VarlenInfo or host offsets "
                        "so that dispatch can pick another backend, or choose one with "
                        "backend=")


def start_indices(shift: int) -> tuple[list[int] | None, list[int] | None]:
    """(q_start_idx, kv_start_idx) for sequences whose sk - sq is ``shift``."""
    if shift > 0:
        return [shift], [0]
    if shift < 0:
        return [0], [-shift]
    return None, None


def alibi_kwargs(problem: VarlenProblem, call: OperatorCall, n_sequences: int,
                 slopes: torch.Tensor | None) -> dict:
    """The v2 arguments of ALiBi: pse = float32 slopes, (nheads,) or (call's sequences,
    nheads), pse_type 2, the start indices of the call's shift."""
    if slopes is None:
        raise ValueError("an ALiBi problem needs its alibi_slopes")
    pse = slopes.float()
    if problem.alibi == "batch_head" and call.sequences != tuple(range(n_sequences)):
        index = torch.tensor(call.sequences, dtype=torch.int64).to(pse.device,
                                                                     non_blocking=True)
        pse = pse.index_select(0, index)
    q_start, kv_start = start_indices(call.shift)
    return {"pse": pse.contiguous(), "pse_type": PSE_GENERATED_ALIBI, "q_start_idx": q_start,
            "kv_start_idx": kv_start}


def _with_alibi(kwargs: dict, problem: VarlenProblem, call: OperatorCall, n_sequences: int,
                slopes: torch.Tensor | None) -> dict:
    if problem.alibi is None:
        return kwargs
    kwargs["pre_tokens"] = kwargs.pop("pre_tockens")
    kwargs["next_tokens"] = kwargs.pop("next_tockens")
    return {**kwargs, **alibi_kwargs(problem, call, n_sequences, slopes)}


def forward_kwargs(problem: VarlenProblem, call: OperatorCall, device: torch.device,
                   n_sequences: int, slopes: torch.Tensor | None = None,
                   sinks: torch.Tensor | None = None) -> dict:
    """Keyword arguments of the forward operator (``operators(problem)[0]``)(query, key,
    value, **kwargs) for one call; n_sequences: the batch of the attnhub call."""
    kwargs = {**common_kwargs(problem, call, device), "scale": problem.scale,
              **sink_kwargs(sinks)}
    return _with_alibi(kwargs, problem, call, n_sequences, slopes)


def grad_kwargs(problem: VarlenProblem, call: OperatorCall, device: torch.device,
                n_sequences: int, softmax_max: torch.Tensor, softmax_sum: torch.Tensor,
                out: torch.Tensor, seed: int, offset: int,
                slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None) -> dict:
    """Keyword arguments of the backward operator (``operators(problem)[1]``)(query, key,
    value, dy, **kwargs); the backward names the scale ``scale_value``."""
    kwargs = {
        **common_kwargs(problem, call, device),
        **_grad_inputs(problem, softmax_max, softmax_sum, out, seed, offset),
        "numels": dropout_numels(problem, call),
        **sink_kwargs(sinks),
    }
    return _with_alibi(kwargs, problem, call, n_sequences, slopes)


def device_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """The v3 operators' actual_seq_qlen / actual_seq_kvlen: END offsets without the leading
    0, int64, on the device (a slice and a cast: no host read)."""
    return cu_seqlens[1:].to(torch.int64)


def v3_forward_kwargs(problem: VarlenProblem, cu_seqlens_q: torch.Tensor,
                      cu_seqlens_k: torch.Tensor, device: torch.device,
                      sinks: torch.Tensor | None = None) -> dict:
    """Keyword arguments of npu_fusion_attention_v3 with the lengths as device tensors."""
    return {**_shared(problem, device, device_lengths(cu_seqlens_q),
                      device_lengths(cu_seqlens_k)), "scale": problem.scale,
            **sink_kwargs(sinks)}


def v3_grad_kwargs(problem: VarlenProblem, cu_seqlens_q: torch.Tensor,
                   cu_seqlens_k: torch.Tensor, device: torch.device,
                   softmax_max: torch.Tensor, softmax_sum: torch.Tensor, out: torch.Tensor,
                   seed: torch.Tensor | None, offset: torch.Tensor | None,
                   sinks: torch.Tensor | None = None) -> dict:
    """Keyword arguments of npu_fusion_attention_grad_v3: lengths, seed and offset as
    tensors (no numels: v3 recomputes it)."""
    return {
        **_shared(problem, device, device_lengths(cu_seqlens_q), device_lengths(cu_seqlens_k)),
        **_grad_inputs(problem, softmax_max, softmax_sum, out, seed, offset),
        **sink_kwargs(sinks),
    }


def _grad_inputs(problem: VarlenProblem, softmax_max: torch.Tensor, softmax_sum: torch.Tensor,
                 out: torch.Tensor, seed: object, offset: object) -> dict:
    """What every backward operator takes from the forward (it names the scale
    ``scale_value``)."""
    return {"softmax_max": softmax_max, "softmax_sum": softmax_sum, "softmax_in": None,
            "attention_in": out, "scale_value": problem.scale, "seed": seed, "offset": offset}


def dropout_numels(problem: VarlenProblem, call: OperatorCall) -> int:
    """Elements of the dropout mask: nheads * sum(sq * sk) over the call's sequences (what
    forward returns as numels, recomputed in backward as torch_npu's v3 API does)."""
    if problem.dropout_p == 0:
        return 0
    return problem.nheads * sum(a * b for a, b in zip(call.seqlens_q, call.seqlens_k,
                                                      strict=True))
