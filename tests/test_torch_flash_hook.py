"""attnhub behind PyTorch's flash attention registry (torch.nn.attention
.activate_flash_attention_impl("attnhub")): varlen_attn on the CPU (where PyTorch has no
flash kernel of its own) and, on a GPU, varlen_attn and SDPA's flash backend, against attnhub
called directly."""

from __future__ import annotations

import inspect

import pytest
import torch

import attnhub

tf = pytest.importorskip("attnhub.integrations.torch_flash")
if not tf.supported():
    pytest.skip(f"torch {torch.__version__} has no flash attention impl registry",
                allow_module_level=True)

import torch.nn.attention as attention  # noqa: E402
from torch.nn.attention.varlen import varlen_attn  # noqa: E402


@pytest.fixture
def active():
    attention.activate_flash_attention_impl("attnhub")
    try:
        yield
    finally:
        attention.restore_flash_attention_impl()


def _qkv(total, heads=4, heads_k=2, dim=16, device="cpu", dtype=torch.float32):
    gen = torch.Generator(device).manual_seed(0)
    return [torch.randn(total, h, dim, generator=gen, device=device, dtype=dtype,
                        requires_grad=True) for h in (heads, heads_k, heads_k)]


def _causal_gqa_kwargs() -> dict:
    """varlen_attn's causal + GQA arguments in this torch's spelling (releases differ)."""
    params = inspect.signature(varlen_attn).parameters
    kwargs = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
    if "enable_gqa" in params:
        kwargs["enable_gqa"] = True
    return kwargs


def _grads(out, tensors):
    return torch.autograd.grad(out.square().sum(), tensors)


def test_registered_under_its_name():
    assert "attnhub" in attention.list_flash_attention_impls()


@pytest.mark.parametrize(("window", "causal", "window_size"), [
    ((-1, -1), False, None), ((-1, 0), True, None), ((3, 0), True, (3, 0)),
    ((2, 1), False, (2, 1))])
def test_varlen_attn_runs_attnhub_on_cpu(active, window, causal, window_size):
    assert attention.current_flash_attention_impl() == "attnhub"
    info = attnhub.VarlenInfo.from_lengths([5, 0, 9, 3])
    q, k, v = _qkv(info.total)
    out = varlen_attn(q, k, v, info.cu_seqlens, info.cu_seqlens, info.max_seqlen,
                      info.max_seqlen, window_size=window, enable_gqa=True, scale=0.3)
    expected = attnhub.attention_forward_varlen(q, k, v, info, info, causal=causal,
                                                window_size=window_size, softmax_scale=0.3)
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want)


def test_restore_gives_the_cpu_back_to_pytorch():
    attention.activate_flash_attention_impl("attnhub")
    attention.restore_flash_attention_impl()
    info = attnhub.VarlenInfo.from_lengths([4])
    q, k, v = _qkv(info.total, heads_k=4)
    with pytest.raises(NotImplementedError):  # PyTorch has no CPU flash kernel
        varlen_attn(q, k, v, info.cu_seqlens, info.cu_seqlens, 4, 4)


def test_what_the_aten_ops_cannot_carry_raises(active):
    info = attnhub.VarlenInfo.from_lengths([4])
    q, k, v = _qkv(info.total, heads_k=4)
    with pytest.raises(NotImplementedError, match="dropout_p"):
        torch.ops.aten._flash_attention_forward(
            q, k, v, info.cu_seqlens, info.cu_seqlens, 4, 4, 0.1, False, False)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        torch.ops.aten._flash_attention_forward(
            q, k, v, info.cu_seqlens, info.cu_seqlens, 4, 4, 0.0, False, False,
            alibi_slopes=torch.ones(4))


@pytest.mark.gpu
def test_cuda_varlen_and_sdpa_run_attnhub(active):
    """On CUDA both of PyTorch's flash entry points run attnhub; attnhub's own torch-flash
    backend, reached from inside, still gets PyTorch's original kernel."""
    info = attnhub.VarlenInfo.from_lengths([300, 1, 77, 0, 256], "cuda")
    kwargs = _causal_gqa_kwargs()
    q, k, v = _qkv(info.total, 8, 2 if "enable_gqa" in kwargs else 8, 128, "cuda",
                   torch.bfloat16)
    out = varlen_attn(q, k, v, info.cu_seqlens, info.cu_seqlens, info.max_seqlen,
                      info.max_seqlen, **kwargs)
    expected = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True)
    torch.testing.assert_close(out, expected, atol=2e-2, rtol=2e-2)
    for got, want in zip(_grads(out, (q, k, v)), _grads(expected, (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
    with attnhub.use_backend("torch-flash"):
        again = varlen_attn(q, k, v, info.cu_seqlens, info.cu_seqlens, info.max_seqlen,
                            info.max_seqlen, **kwargs)
    torch.testing.assert_close(again, expected, atol=2e-2, rtol=2e-2)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    gen = torch.Generator("cuda").manual_seed(1)
    dense = [torch.randn(2, 8, 512, 128, generator=gen, device="cuda", dtype=torch.bfloat16,
                         requires_grad=True) for _ in range(3)]
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(*dense, is_causal=True)
    ref_info = attnhub.VarlenInfo.from_lengths([512, 512], "cuda")
    flat = [t.transpose(1, 2).reshape(1024, 8, 128) for t in dense]
    expected = attnhub.attention_forward_varlen(*flat, ref_info, ref_info, causal=True)
    torch.testing.assert_close(out.transpose(1, 2).reshape(1024, 8, 128), expected,
                               atol=2e-2, rtol=2e-2)
    for got, want in zip(_grads(out.transpose(1, 2).reshape(1024, 8, 128), dense),
                         _grads(expected, dense), strict=True):
        torch.testing.assert_close(got, want, atol=5e-2, rtol=5e-2)
