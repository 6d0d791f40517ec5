"""On a CUDA GPU: normalization and dispatch never synchronise when the host has the lengths.

Run on the device machine: python -m pytest -m gpu tests/test_gpu_sync.py
"""


import pytest
import torch
from cuda_sync import no_sync

import attnhub
from attnhub import dispatch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _qkv(total: int, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(total, 8, 64, device=device, generator=g, dtype=torch.bfloat16)
    k = torch.randn(total, 2, 64, device=device, generator=g, dtype=torch.bfloat16)
    v = torch.randn(total, 2, 64, device=device, generator=g, dtype=torch.bfloat16)
    return q, k, v


def test_varlen_info_normalize_and_select_do_not_sync():
    info = attnhub.VarlenInfo.from_lengths([64, 0, 17, 300], "cuda")
    q, k, v = _qkv(info.total)
    with no_sync():
        problem, inputs = attnhub.normalize(q, k, v, info, info, causal=True)
        chosen = dispatch.select(problem).name
    assert chosen
    assert problem.seqlens_q == (64, 0, 17, 300)
    assert inputs.cu_seqlens_q.device.type == "cuda"


def test_device_tensor_with_max_seqlen_does_not_sync(monkeypatch):
    monkeypatch.setenv("ATTNHUB_VALIDATE", "auto")
    cu = torch.tensor([0, 64, 64, 81, 381], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(381)
    with no_sync():
        problem, _ = attnhub.normalize(q, k, v, cu, cu, 300, 300, causal=True)
        chosen = dispatch.select(problem).name
    assert chosen
    assert problem.max_seqlen_q == 300 and problem.seqlens_q is None


def test_device_tensor_without_max_seqlen_reads_back_once():
    cu = torch.tensor([0, 64, 64, 81, 381], dtype=torch.int32, device="cuda")
    q, k, v = _qkv(381)
    first, _ = attnhub.normalize(q, k, v, cu, cu)
    assert first.max_seqlen_q == 300 and first.seqlens_k == (64, 0, 17, 300)
    with no_sync():  # the host copy of this tensor object is cached: no second read-back
        again, _ = attnhub.normalize(q, k, v, cu, cu)
    assert again.seqlens_q == first.seqlens_q


def test_reference_on_cuda_matches_cpu():
    info = attnhub.VarlenInfo.from_lengths([64, 0, 17, 300], "cuda")
    q, k, v = _qkv(info.total)
    out, lse = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True, softcap=20.0,
                                                window_size=(100, 0), return_lse=True,
                                                backend="reference")
    cpu = [t.cpu() for t in (q, k, v)]
    out_c, lse_c = attnhub.attention_forward_varlen(*cpu, info, info, causal=True,
                                                    softcap=20.0, window_size=(100, 0),
                                                    return_lse=True, backend="reference")
    assert (out.float().cpu() - out_c.float()).abs().max() < 2e-2
    assert torch.equal(torch.isneginf(lse.cpu()), torch.isneginf(lse_c))
    finite = torch.isfinite(lse_c)
    assert (lse.cpu()[finite] - lse_c[finite]).abs().max() < 1e-3
