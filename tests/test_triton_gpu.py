"""The Triton backend on a CUDA GPU: agreement with the reference in bf16/fp16, no recompiles
for new lengths (or new batch sizes without host lengths), no host sync with a VarlenInfo.

Run on the device machine: python -m pytest -m gpu tests/test_triton_gpu.py
"""

import itertools

import pytest
import torch

import attnhub

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _qkv(lengths, dtype, nheads=8, nheads_k=2, head_dim=128, grad=False):
    g = torch.Generator(device="cuda").manual_seed(sum(lengths))
    total = sum(lengths)

    def r(h):
        x = torch.randn(total, h, head_dim, device="cuda", dtype=dtype, generator=g)
        return x.requires_grad_(grad)

    return r(nheads), r(nheads_k), r(nheads_k)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (64, 0)},
                                {"softcap": 30.0, "causal": True}])
def test_triton_matches_reference(dtype, kw):
    lengths = [1000, 1, 0, 333, 2048, 77]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    q, k, v = _qkv(lengths, dtype, grad=True)
    out, lse = attnhub.attention_forward_varlen(q, k, v, info, info, return_lse=True,
                                                backend="triton", **kw)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = attnhub.attention_forward_varlen(*ref_in, info, info, return_lse=True,
                                                    backend="reference", **kw)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert (out.double() - ref).abs().max() < tol
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    assert (lse.double() - ref_lse)[finite].abs().max() < 1e-3
    for g, rg in zip(grads, ref_grads, strict=True):
        assert (g.double() - rg).abs().max() < 5 * tol


def _compiled_variants(kernel) -> int:
    from triton.runtime.autotuner import Autotuner

    if isinstance(kernel, Autotuner):
        kernel = kernel.fn  # the JITFunction under it
    caches = getattr(kernel, "device_caches", None)
    if caches is not None:  # triton >= 3.2: device -> (kernel cache, ...)
        return sum(len(entry[0]) for entry in caches.values())
    return sum(len(c) for c in kernel.cache.values())


def _stage_kernels(monkeypatch):
    """Every kernel that can serve each stage (forward, dK/dV, dQ): the tl kernel, and on an
    sm_90 GPU with a Triton that has Gluon, the warp-specialised Hopper kernel, which then
    serves short calls too (TL_BELOW off: the lengths below would switch kernels)."""
    from attnhub.backends.triton import backward, forward, hopper_backward, hopper_forward

    monkeypatch.setattr(hopper_forward, "TL_BELOW", {})
    monkeypatch.setattr(hopper_forward, "TL_SOFTCAP_DEVICE_OFFSETS", ())

    gluon_fwd = getattr(hopper_forward, "_hopper_fwd_kernel", None)
    gluon_dkdv = getattr(hopper_backward, "_hopper_dkdv_kernel", None)
    stages = ((forward._fwd_kernel, gluon_fwd), (backward._dkdv_kernel, gluon_dkdv),
              (backward._dq_kernel,))
    return [tuple(k for k in stage if k is not None) for stage in stages]


def test_new_lengths_do_not_recompile(monkeypatch):
    stages = _stage_kernels(monkeypatch)
    counts = None
    for lengths in ([512, 17, 300], [1, 2, 3, 4, 5, 6, 7, 8, 9], [4096], [33, 0, 1024, 16]):
        q, k, v = _qkv(lengths, torch.bfloat16, grad=True)
        info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
        out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                               backend="triton")
        out.sum().backward()
        torch.cuda.synchronize()
        now = [[_compiled_variants(kern) for kern in stage] for stage in stages]
        if counts is None:
            counts = now
            assert all(sum(stage) >= 1 for stage in counts), f"a stage never ran: {counts}"
        assert now == counts, f"recompiled for lengths {lengths}: {counts} -> {now}"


def test_device_offsets_find_tiles_in_the_kernels(monkeypatch):
    """Device offsets with max_seqlen (no host lengths): the kernels find their own tiles,
    also over more sequences than one lookup chunk, agree with the reference, and new batch
    sizes do not recompile."""
    stages = _stage_kernels(monkeypatch)
    counts = None
    for lengths in ([300, 0, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9], [0, 5, 130, 1] * 80):
        q, k, v = _qkv(lengths, torch.bfloat16, grad=True)
        cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32,
                          device="cuda")
        longest = max(lengths)
        problem, _ = attnhub.normalize(q, k, v, cu, cu, longest, longest, causal=True)
        assert not problem.lengths_known
        out = attnhub.attention_forward_varlen(q, k, v, cu, cu, longest, longest, causal=True,
                                               backend="triton")
        dout = torch.randn_like(out)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.cuda.synchronize()
        now = [[_compiled_variants(kern) for kern in stage] for stage in stages]
        if counts is None:
            counts = now
        assert now == counts, f"recompiled for batch {len(lengths)}: {counts} -> {now}"
        ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref = attnhub.attention_forward_varlen(*ref_in, cu, cu, longest, longest, causal=True,
                                               backend="reference")
        ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
        assert (out.double() - ref).abs().max() < 2e-2
        for g, rg in zip(grads, ref_grads, strict=True):
            assert (g.double() - rg).abs().max() < 1e-1


def _run_case(dtype=torch.bfloat16, causal=True):
    lengths = [300, 1, 77, 0, 129]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    q, k, v = _qkv(lengths, dtype, grad=True)
    out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=causal,
                                           backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention_forward_varlen(*ref_in, info, info, causal=causal,
                                           backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    errors = [(out.double() - ref).abs().max().item()]
    errors += [(g.double() - rg).abs().max().item() for g, rg in zip(grads, ref_grads,
                                                                      strict=True)]
    return errors


@pytest.mark.parametrize("kernel_name", ["fwd", "dkdv", "dq"])
def test_every_config_the_autotuner_may_pick_is_correct(kernel_name, monkeypatch):
    """Triton has miscompiled some configs (configs.BROKEN); none that remain may be wrong,
    with any outer tile the head-dim-128 launches use (causal calls take 128-row key tiles).
    The Gluon kernels, which would serve these calls on an H100/H200, are turned off."""
    from attnhub.backends.triton import (
        backward,
        configs,
        forward,
        hopper_backward,
        hopper_dq,
        hopper_forward,
    )

    for module in (hopper_forward, hopper_backward, hopper_dq):
        monkeypatch.setattr(module, "supports", lambda *args, **kwargs: False)
    kernel = {"fwd": forward._fwd_kernel, "dkdv": backward._dkdv_kernel,
              "dq": backward._dq_kernel}[kernel_name]
    inner = {"fwd": "BLOCK_N", "dkdv": "BLOCK_M", "dq": "BLOCK_N"}[kernel_name]
    wrong = []
    for cfg in configs.candidates(kernel_name, inner):
        choice = (cfg.kwargs[inner], cfg.num_warps, cfg.num_stages)
        for key in [key for key in configs.DEFAULTS[kernel_name] if key[0] == 128]:
            monkeypatch.setitem(configs.DEFAULTS[kernel_name], key, choice)
        for causal in (False, True):
            kernel.cache.clear()
            errors = _run_case(causal=causal)
            if max(errors) > 0.1:
                wrong.append((choice, causal, errors))
    kernel.cache.clear()
    assert not wrong, f"configs giving wrong results: {wrong}"


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"softcap": 20.0, "window_size": (700, 0)}])
def test_decode_split_kv_matches_reference(kw):
    """One or a few query tokens over a long paged cache take the split-KV decode path."""
    from attnhub.backends.triton import decode

    g = torch.Generator(device="cuda").manual_seed(1)
    lq, lk, ps = [1, 4, 1, 2], [3000, 1500, 0, 777], 16
    pages = [-(-n // ps) for n in lk]
    num_pages = sum(pages) + 3
    kpool = torch.randn(num_pages, ps, 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    vpool = torch.randn_like(kpool)
    order = torch.randperm(num_pages, generator=torch.Generator().manual_seed(0)).tolist()
    table = torch.zeros(len(lk), max(pages), dtype=torch.int32)
    for b, n in enumerate(pages):
        for p in range(n):
            table[b, p] = order.pop()
    table = table.cuda()
    q = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    info_q = attnhub.VarlenInfo.from_lengths(lq, "cuda")
    info_k = attnhub.VarlenInfo.from_lengths(lk, "cuda")
    problem, _ = attnhub.normalize(q, kpool, vpool, info_q, info_k, block_table=table, **kw)
    assert decode.eligible(problem)
    out, lse = attnhub.attention_forward_varlen(q, kpool, vpool, info_q, info_k,
                                                block_table=table, return_lse=True,
                                                backend="triton", **kw)
    ref, ref_lse = attnhub.attention_forward_varlen(
        q.double(), kpool.double(), vpool.double(), info_q, info_k, block_table=table,
        return_lse=True, backend="reference", **kw)
    assert (out.double() - ref).abs().max() < 2e-2
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse.double() - ref_lse)[finite].abs().max() < 1e-3


@pytest.mark.parametrize("kw", [{"causal": True}, {"window_size": (64, 0), "softcap": 30.0}])
def test_triton_kernels_with_sinks_match_reference(kw):
    """The tl kernels' sinks (forward, delta pass's dsinks, decode combine) compiled for this
    GPU, against the float64 reference; sequence lengths with rows that see no key (sq > sk,
    sk = 0)."""
    from attnhub.backends.triton import backward, decode, forward

    lq, lk = [1000, 7, 0, 333, 200], [900, 0, 5, 333, 64]
    g = torch.Generator(device="cuda").manual_seed(4)
    q = torch.randn(sum(lq), 8, 128, device="cuda", dtype=torch.bfloat16, generator=g)
    k, v = (torch.randn(sum(lk), 2, 128, device="cuda", dtype=torch.bfloat16, generator=g)
            for _ in range(2))
    sinks = torch.randn(8, device="cuda", generator=g) * 2
    sinks[0] = 30.0
    iq = attnhub.VarlenInfo.from_lengths(lq, "cuda")
    ik = attnhub.VarlenInfo.from_lengths(lk, "cuda")
    problem, inputs = attnhub.normalize(q, k, v, iq, ik, **kw)
    out, lse = forward.forward(problem, inputs, None, sinks=sinks, gluon=False)
    dout = torch.randn_like(out)
    dlse = torch.randn_like(lse)
    got = backward.backward(problem, inputs, out, lse, dout, dlse, None, sinks=sinks)
    ref_in = [*(t.double().requires_grad_() for t in (q, k, v)),
              sinks.clone().requires_grad_()]  # sinks stay float32
    ref, ref_lse = attnhub.attention_forward_varlen(*ref_in[:3], iq, ik, return_lse=True,
                                                    backend="reference", sinks=ref_in[3],
                                                    **kw)
    ref_grads = torch.autograd.grad((ref * dout.double()).sum() + (ref_lse * dlse).sum(),
                                    ref_in)
    assert (out.double() - ref).abs().max() < 2e-2
    assert torch.isfinite(lse).all() and (lse.double() - ref_lse).abs().max() < 1e-3
    for name, a, b in zip(("dq", "dk", "dv", "dsinks"), got, ref_grads, strict=True):
        err = (a.double() - b).abs().max().item()
        assert err < (1e-1 if name != "dsinks" else 2e-2 * max(1.0, b.abs().max().item())), \
            f"{name}: {err}"

    # the split-KV decode path: one query token per sequence over the same keys
    qd = q[: len(lk)].contiguous()
    iqd = attnhub.VarlenInfo.from_lengths([1] * len(lk), "cuda")
    problem, inputs = attnhub.normalize(qd, k, v, iqd, ik, **kw)
    assert decode.eligible(problem)
    out, lse = decode.forward(problem, inputs, sinks=sinks)
    ref, ref_lse = attnhub.attention_forward_varlen(qd.double(), k.double(), v.double(), iqd,
                                                    ik, return_lse=True, backend="reference",
                                                    sinks=sinks, **kw)
    assert (out.double() - ref).abs().max() < 2e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-3
