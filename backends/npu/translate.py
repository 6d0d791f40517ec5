"""attnhub's problem -> the exact keyword arguments of npu_fusion_attention(_grad), TND.

Mapping (Ascend's documentation, cited in docs/npu.md):

* no mask (window (-1, -1)): sparse_mode 0 and no atten_mask (pre/next are then ignored);
* causal, unbounded left: sparse_mode 3 (rightDownCausal) with the compressed mask;
* any other window (left, right), bottom-right aligned: sparse_mode 4 (band) with the
  compressed mask, pre_tockens = left and next_tockens = right (2**31 - 1 where unbounded;
  causal has right = 0);
* scale always passed (the operator's default is 1.0); keep_prob = 1 - dropout_p;
* inner_precise 2 when some query row sees no key, so those rows come back as zeros;
* actual_seq_qlen / actual_seq_kvlen: Python int lists of END offsets (layout.TndLayout);
* ALiBi (every computed sequence has sq == sk): npu_fusion_attention_v2 / _grad_v2, whose
  pse_type 2 generates ``-slope[h] * |i - j|`` from float32 slopes added after the scale;
  pse = the slopes, (nheads,) as given or (batch, nheads) restricted to the computed
  sequences; v2 names the band arguments pre_tokens / next_tokens.
"""

from __future__ import annotations

import torch

from attnhub.problem import VarlenProblem

from .layout import TndLayout

INT32_MAX = 2**31 - 1
COMPRESSED_MASK_SIZE = 2048
SPARSE_NONE, SPARSE_CAUSAL, SPARSE_BAND = 0, 3, 4
PSE_GENERATED_ALIBI = 2  # pse_type: the operator generates -slope * |i - j|, mul then add
V1 = ("npu_fusion_attention", "npu_fusion_attention_grad")
V2 = ("npu_fusion_attention_v2", "npu_fusion_attention_grad_v2")

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


def common_kwargs(problem: VarlenProblem, layout: TndLayout, device: torch.device) -> dict:
    """The arguments forward and backward share (everything but tensors and statistics)."""
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
        "inner_precise": 2 if layout.dead_rows else 0,
        "prefix": None,
        "actual_seq_qlen": list(layout.actual_seq_qlen),
        "actual_seq_kvlen": list(layout.actual_seq_kvlen),
        "sparse_mode": sparse_mode,
    }


def operators(problem: VarlenProblem) -> tuple[str, str]:
    """Names of the (forward, backward) torch_npu functions: the v2 pair for ALiBi (only v2
    takes pse_type), else npu_fusion_attention / npu_fusion_attention_grad."""
    return V2 if problem.alibi is not None else V1


# Why a length constraint can still fail at run time, and what the caller can do.
UNKNOWN_LENGTHS_HINT = ("; these lengths were not known when the backend was chosen "
                        "(device offsets with max_seqlen): pass a VarlenInfo or host offsets "
                        "so that dispatch can pick another backend, or choose one with "
                        "backend=")


def alibi_kwargs(problem: VarlenProblem, layout: TndLayout, slopes: torch.Tensor | None
                 ) -> dict:
    """The v2 arguments of ALiBi: pse = float32 slopes, (nheads,) or (active batch, nheads),
    pse_type 2, no start-index shift; the band arguments under v2's names."""
    if slopes is None:
        raise ValueError("an ALiBi problem needs its alibi_slopes")
    if any(layout.seqlens_q[b] != layout.seqlens_k[b] for b in layout.active):
        raise ValueError("ALiBi on npu_fusion_attention_v2 needs sq == sk in every sequence "
                         "(pse_type 2 'supports only Sq == Skv')" + UNKNOWN_LENGTHS_HINT)
    pse = slopes.float()
    if problem.alibi == "batch_head" and layout.compacted:
        index = torch.tensor(layout.active, dtype=torch.int64).to(pse.device, non_blocking=True)
        pse = pse.index_select(0, index)
    return {"pse": pse.contiguous(), "pse_type": PSE_GENERATED_ALIBI, "q_start_idx": None,
            "kv_start_idx": None}


def _with_alibi(kwargs: dict, problem: VarlenProblem, layout: TndLayout,
                slopes: torch.Tensor | None) -> dict:
    if problem.alibi is None:
        return kwargs
    kwargs["pre_tokens"] = kwargs.pop("pre_tockens")
    kwargs["next_tokens"] = kwargs.pop("next_tockens")
    return {**kwargs, **alibi_kwargs(problem, layout, slopes)}


def forward_kwargs(problem: VarlenProblem, layout: TndLayout, device: torch.device,
                   slopes: torch.Tensor | None = None) -> dict:
    """Keyword arguments of the forward operator (``operators(problem)[0]``)(query, key,
    value, **kwargs)."""
    kwargs = {**common_kwargs(problem, layout, device), "scale": problem.scale}
    return _with_alibi(kwargs, problem, layout, slopes)


def grad_kwargs(problem: VarlenProblem, layout: TndLayout, device: torch.device,
                softmax_max: torch.Tensor, softmax_sum: torch.Tensor, out: torch.Tensor,
                seed: int, offset: int, slopes: torch.Tensor | None = None) -> dict:
    """Keyword arguments of the backward operator (``operators(problem)[1]``)(query, key,
    value, dy, **kwargs); the backward names the scale ``scale_value``."""
    kwargs = {
        **common_kwargs(problem, layout, device),
        "softmax_max": softmax_max,
        "softmax_sum": softmax_sum,
        "softmax_in": None,
        "attention_in": out,
        "scale_value": problem.scale,
        "seed": seed,
        "offset": offset,
        "numels": dropout_numels(problem, layout),
    }
    return _with_alibi(kwargs, problem, layout, slopes)


def dropout_numels(problem: VarlenProblem, layout: TndLayout) -> int:
    """Elements of the dropout mask: nheads * sum(sq * sk) over the computed sequences (what
    forward returns as numels, recomputed in backward as torch_npu's v3 API does)."""
    if problem.dropout_p == 0:
        return 0
    return problem.nheads * sum(layout.seqlens_q[b] * layout.seqlens_k[b] for b in layout.active)
