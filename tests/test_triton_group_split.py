"""dK/dV with a GQA group split over several programs (backends/triton/group_split.py): the
split decision, and on the CPU (TRITON_INTERPRET=1) gradients equal to the float64 oracle and
to the unsplit kernel's."""

from __future__ import annotations

import pytest
import torch
from naive import make_qkv, naive_attention

import attnhub
from attnhub.backends.triton import configs, group_split


class _Problem:
    def __init__(self, total_k, nheads, nheads_k, batch=4, paged=None):
        self.total_k, self.nheads, self.nheads_k = total_k, nheads, nheads_k
        self.group_size, self.batch, self.paged = nheads // nheads_k, batch, paged


@pytest.fixture
def sms_132(monkeypatch):
    monkeypatch.setattr(group_split, "_sm_count", lambda index: 132)


def test_mqa_at_16k_tokens_splits_until_the_grid_fills_the_gpu(sms_132):
    # (16384 // 128 + 4) * 1 = 132 programs; 4 per SM on 132 SMs wants 528: split 4
    assert group_split.split_for(_Problem(16384, 32, 1), torch.device("cuda", 0)) == 4


@pytest.mark.parametrize("problem, why", [
    (_Problem(16384, 32, 32), "MHA has no group to split"),
    (_Problem(256, 32, 1), "a small call keeps one program per group"),
    (_Problem(65536, 32, 8), "enough programs already"),
    (_Problem(16384, 32, 1, paged=object()), "paged K/V"),
])
def test_no_split(sms_132, problem, why):
    assert group_split.split_for(problem, torch.device("cuda", 0)) == 1, why


def test_split_divides_the_group(sms_132):
    # group 6: only a split of 2 divides it
    assert group_split.split_for(_Problem(65536, 6, 1), torch.device("cuda", 0)) == 2


def test_cpu_never_splits():
    assert group_split.split_for(_Problem(1 << 20, 32, 1), torch.device("cpu")) == 1


def test_reduce_sums_each_kv_heads_shares_in_float32():
    part = torch.arange(2 * 6 * 3, dtype=torch.float32).reshape(2, 6, 3)  # 2 kv heads, split 3
    got = group_split.reduce(part, 2, 3, torch.float64)
    assert got.dtype == torch.float64 and got.shape == (2, 2, 3)
    assert torch.equal(got, part.view(2, 2, 3, 3).sum(2).double())


@pytest.mark.skipif(not configs.interpreting(),
                    reason="CPU tensors reach the Triton kernels only in the interpreter "
                           "(TRITON_INTERPRET=1)")
@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("features", [{"causal": True}, {"window_size": (7, 3)},
                                      {"alibi_slopes": torch.tensor([0.5, 0.25, 0.125, 0.0625])}])
def test_split_gradients_match_the_oracle_and_the_unsplit_kernel(monkeypatch, split, features):
    """4 query heads on 1 kv head: each share of the group must see its own heads (ALiBi's
    slope per head shows a wrong head), and the summed partials equal the unsplit result."""
    q, k, v, cq, ck = make_qkv([5, 40, 0, 17], [9, 40, 3, 17], 4, 1, 16,
                               dtype=torch.float32, seed=3)
    for t in (q, k, v):
        t.requires_grad_(True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(4))

    def grads(n):
        monkeypatch.setattr(group_split, "split_for", lambda problem, device: n)
        out = attnhub.attention_forward_varlen(q, k, v, cq, ck, backend="triton", **features)
        return torch.autograd.grad(out, (q, k, v), dout)

    got, unsplit = grads(split), grads(1)
    want = naive_attention(q, k, v, cq, ck, **features)
    ref = torch.autograd.grad(want.out, (q, k, v), dout.double())
    for g, u, r in zip(got, unsplit, ref, strict=True):
        assert g.dtype == torch.float32
        assert (g.double() - r).abs().max().item() < 1e-5
        assert (g - u).abs().max().item() < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("head_dim, causal", [(128, True), (64, False), (256, True)])
def test_split_gradients_on_the_gpu(head_dim, causal):
    """MQA over 8k tokens splits (the Gluon dK/dV at d128 causal, the tl one otherwise);
    gradients within the conformance-style bound of the float64 reference, like FA2's,
    and replays (third call on) equal to the recorded launch's."""
    lengths = [3000, 1, 77, 0, 2100, 3014]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(info.total, h, head_dim, device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_() for h in (32, 1, 1))
    problem, _ = attnhub.normalize(q, k, v, info, info, causal=causal)
    assert group_split.split_for(problem, q.device) > 1
    dout = torch.randn(q.shape, device="cuda", dtype=torch.bfloat16, generator=g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention_forward_varlen(*ref_in, info, info, causal=causal,
                                           backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())

    def grads(backend):
        out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=causal,
                                               backend=backend)
        return torch.autograd.grad(out, (q, k, v), dout)

    fa2 = grads("torch-flash")
    runs = [grads("triton") for _ in range(4)]
    for got, want, r in zip(runs[0], fa2, ref_grads, strict=True):
        fa2_err = (want.double() - r).abs().max().item()
        assert (got.double() - r).abs().max().item() <= 2 * fa2_err + 1e-3
    for later in runs[1:]:
        for a, b in zip(later, runs[0], strict=True):
            assert torch.equal(a, b)
