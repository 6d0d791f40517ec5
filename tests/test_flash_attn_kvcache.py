"""flash_attn_with_kvcache: in-place append, rotary, contiguous / paged / leftpad / batch-idx
caches, against the naive oracle on the sequences the cache holds."""

from __future__ import annotations

import pytest
import torch
from naive import F64, assert_lse, assert_out, naive_attention, offsets, randn

from attnhub import InvalidArgumentError
from attnhub.flash_attn import flash_attn_with_kvcache

B, SQ, H, HK, D, S_CACHE = 3, 2, 4, 2, 16, 12


def rotate_oracle(x, cos, sin, positions, interleaved):
    """Rotary written as complex multiplication, one channel pair at a time."""
    out = x.clone()
    half = cos.shape[1]
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            p = int(positions[b][i])
            for c in range(half):
                a, z = (2 * c, 2 * c + 1) if interleaved else (c, c + half)
                rot = complex(cos[p, c].item(), sin[p, c].item())
                val = (x[b, i, :, a].to(F64) + 1j * x[b, i, :, z].to(F64)) * rot
                out[b, i, :, a] = val.real.to(x.dtype)
                out[b, i, :, z] = val.imag.to(x.dtype)
    return out


def _oracle(q, k_seqs, v_seqs, **kw):
    """q (B, SQ, H, D); k_seqs / v_seqs: per-sequence (len, HK, D)."""
    lens = [t.shape[0] for t in k_seqs]
    want = naive_attention(q.reshape(-1, H, D), torch.cat(k_seqs), torch.cat(v_seqs),
                           offsets([SQ] * B), offsets(lens), **kw)
    return want.out.view(q.shape), want.lse.view(H, B, SQ).transpose(0, 1)


def _inputs(seed, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = randn((B, SQ, H, D), dtype, gen)
    k_cache = randn((B + 1, S_CACHE, HK, D), dtype, gen)
    v_cache = randn((B + 1, S_CACHE, HK, D), dtype, gen)
    k_new = randn((B, SQ, HK, D), dtype, gen)
    v_new = randn((B, SQ, HK, D), dtype, gen)
    return q, k_cache, v_cache, k_new, v_new


@pytest.mark.parametrize("seqlens_form", ["int", "tensor"])
@pytest.mark.parametrize("causal", [False, True])
def test_contiguous_append_in_place(seqlens_form, causal):
    q, kc, vc, kn, vn = _inputs(1)
    seqlens = [5, 0, 9]
    before_k = kc.clone()
    cache_seqlens = 4 if seqlens_form == "int" else torch.tensor(seqlens, dtype=torch.int32)
    if seqlens_form == "int":
        seqlens = [4] * B
    out, lse = flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=cache_seqlens,
                                       causal=causal, return_softmax_lse=True)
    for b, n in enumerate(seqlens):
        assert torch.equal(kc[b, n:n + SQ], kn[b]) and torch.equal(vc[b, n:n + SQ], vn[b])
        assert torch.equal(kc[b, :n], before_k[b, :n])
        assert torch.equal(kc[b, n + SQ:], before_k[b, n + SQ:])
    assert torch.equal(kc[B], before_k[B])
    want, want_lse = _oracle(q, [kc[b, :n + SQ] for b, n in enumerate(seqlens)],
                             [vc[b, :n + SQ] for b, n in enumerate(seqlens)], causal=causal)
    assert out.shape == q.shape and lse.shape == (B, H, SQ)
    assert_out(out, want)
    assert_lse(lse, want_lse)


def test_no_new_kv_and_default_full_cache():
    q, kc, vc, _, _ = _inputs(2)
    out = flash_attn_with_kvcache(q, kc[:B], vc[:B], window_size=(3, 0))
    want, _ = _oracle(q, list(kc[:B]), list(vc[:B]), window_size=(3, 0))
    assert_out(out, want)
    seqlens = torch.tensor([3, 12, 1], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, softmax_scale=0.2,
                                  softcap=2.0)
    want, _ = _oracle(q, [kc[b, :n] for b, n in enumerate(seqlens.tolist())],
                      [vc[b, :n] for b, n in enumerate(seqlens.tolist())], softmax_scale=0.2,
                      softcap=2.0)
    assert_out(out, want)


def test_cache_batch_idx_and_leftpad():
    q, kc, vc, kn, vn = _inputs(3)
    idx = torch.tensor([3, 0, 2], dtype=torch.int32)
    seqlens = torch.tensor([6, 4, 8], dtype=torch.int32)
    leftpad = torch.tensor([2, 0, 5], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True,
                                  cache_batch_idx=idx, cache_leftpad=leftpad)
    ks, vs = [], []
    for b in range(B):
        r, n, lp = int(idx[b]), int(seqlens[b]), int(leftpad[b])
        assert torch.equal(kc[r, n:n + SQ], kn[b])
        ks.append(kc[r, lp:n + SQ])
        vs.append(vc[r, lp:n + SQ])
    want, _ = _oracle(q, ks, vs, causal=True)
    assert_out(out, want)


@pytest.mark.parametrize("page_size", [1, 4])
def test_paged_append(page_size):
    q, _, _, kn, vn = _inputs(4)
    gen = torch.Generator().manual_seed(40)
    max_blocks = S_CACHE // page_size
    num_blocks = B * max_blocks + 2
    k_pool = randn((num_blocks, page_size, HK, D), F64, gen)
    v_pool = randn((num_blocks, page_size, HK, D), F64, gen)
    table = torch.randperm(num_blocks, generator=gen)[:B * max_blocks].view(B, max_blocks)
    table = table.to(torch.int32)
    seqlens = [7, 0, 10]
    out = flash_attn_with_kvcache(q, k_pool, v_pool, kn, vn,
                                  cache_seqlens=torch.tensor(seqlens, dtype=torch.int32),
                                  block_table=table, causal=True)

    def gather(pool, b, n):
        rows = torch.cat([pool[int(p)] for p in table[b]])
        return rows[:n]

    for b, n in enumerate(seqlens):
        assert torch.equal(gather(k_pool, b, n + SQ)[n:], kn[b])
    want, _ = _oracle(q, [gather(k_pool, b, n + SQ) for b, n in enumerate(seqlens)],
                      [gather(v_pool, b, n + SQ) for b, n in enumerate(seqlens)], causal=True)
    assert_out(out, want)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_rotary(interleaved, causal):
    q, kc, vc, kn, vn = _inputs(5)
    rot_dim = 8  # rotate half of head_dim: the rest passes through
    gen = torch.Generator().manual_seed(50)
    angles = torch.rand(S_CACHE, rot_dim // 2, generator=gen, dtype=F64) * 6
    cos, sin = angles.cos(), angles.sin()
    seqlens = [3, 0, 7]
    k_orig = kc.clone()
    out = flash_attn_with_kvcache(q, kc, vc, kn, vn, cos, sin,
                                  torch.tensor(seqlens, dtype=torch.int32), causal=causal,
                                  rotary_interleaved=interleaved)
    new_pos = [[n + i for i in range(SQ)] for n in seqlens]
    q_pos = new_pos if causal else [[n] * SQ for n in seqlens]
    k_rot = rotate_oracle(kn, cos, sin, new_pos, interleaved)
    q_rot = rotate_oracle(q, cos, sin, q_pos, interleaved)
    assert torch.equal(k_rot[..., rot_dim:], kn[..., rot_dim:])
    ks, vs = [], []
    for b, n in enumerate(seqlens):
        torch.testing.assert_close(kc[b, n:n + SQ], k_rot[b], rtol=1e-12, atol=1e-12)
        ks.append(torch.cat([k_orig[b, :n], k_rot[b]]))
        vs.append(vc[b, :n + SQ])
    want, _ = _oracle(q_rot, ks, vs, causal=causal)
    assert_out(out, want)


def test_fp16_cache():
    q, kc, vc, kn, vn = _inputs(6, torch.float16)
    out = flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=5, causal=True)
    assert out.dtype == torch.float16
    want, _ = _oracle(q, [kc[b, :5 + SQ] for b in range(B)], [vc[b, :5 + SQ] for b in range(B)],
                      causal=True)
    assert_out(out, want, torch.float16)


@pytest.mark.parametrize("kwargs,arg", [
    ({"k": "new"}, "v"),
    ({"k": "new", "v": "new"}, "cache_seqlens"),
    ({"k": "new", "v": "new", "cache_seqlens": 11}, "cache_seqlens"),
    ({"rotary_cos": "cos", "rotary_sin": "cos", "cache_seqlens": 2}, "rotary_cos"),
    ({"k": "new", "v": "new", "cache_seqlens": 2, "rotary_cos": "big", "rotary_sin": "big"},
     "rotary_cos"),
    ({"cache_seqlens": torch.tensor([1, 2])}, "cache_seqlens"),
    ({"cache_batch_idx": torch.tensor([0, 1, 9])}, "cache_batch_idx"),
    ({"cache_seqlens": torch.tensor([1, 2, 3]), "cache_leftpad": torch.tensor([0, 3, 1])},
     "cache_leftpad"),
    ({"num_splits": -1}, "num_splits"),
    ({"block_table": torch.zeros(3, 2, dtype=torch.int32),
      "cache_batch_idx": torch.tensor([0, 1, 2])}, "cache_batch_idx"),
])
def test_bad_input(kwargs, arg):
    q, kc, vc, kn, vn = _inputs(7)
    subs = {"new": kn, "cos": torch.ones(S_CACHE, 4, dtype=F64),
            "big": torch.ones(S_CACHE, D, dtype=F64)}
    kwargs = {n: subs[v] if isinstance(v, str) else v for n, v in kwargs.items()}
    if kwargs.get("v") is not None:
        kwargs["v"] = vn
    with pytest.raises(InvalidArgumentError) as e:
        flash_attn_with_kvcache(q, kc, vc, **kwargs)
    assert e.value.argument == arg
