"""The dispatch fast path (attnhub.plans): repeated calls reuse one normalization and
selection, with identical results and identical errors."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backend

import attnhub
from attnhub import api, plans


@pytest.fixture
def counted(monkeypatch):
    """Counts full-path normalizations."""
    calls = []
    real = api.normalize

    def normalize(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "normalize", normalize)
    return calls


def _qkv(total=12, grad=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(total, h, 8, generator=g, dtype=dtype).requires_grad_(grad)
            for h in (4, 2, 2)]


def test_repeated_calls_normalize_once(counted):
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    first = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True)
    again = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True)
    assert len(counted) == 1 and torch.equal(first, again)
    other = attnhub.attention_forward_varlen(q, k, v, info, info, causal=False)
    assert len(counted) == 2 and not torch.equal(first, other)


def test_plan_results_equal_the_full_path():
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv(grad=True)
    runs = []
    for _ in range(2):
        out, lse = attnhub.attention_forward_varlen(q, k, v, info, info, window_size=(2, 1),
                                                    softcap=3.0, return_lse=True)
        runs.append((out, lse, *torch.autograd.grad(out.sum() + lse.sum(), (q, k, v))))
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("bad", [
    dict(dropout_p=True), dict(causal=2), dict(window_size=(True, 0)), dict(softmax_scale=True),
    dict(max_seqlen_q=6), dict(max_seqlen_q=True), dict(softcap=-1.0),
    dict(mask_alignment="top-left"), dict(backend="nope")])
def test_errors_after_a_plan_are_the_full_paths(bad):
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    attnhub.attention_forward_varlen(q, k, v, info, info, max_seqlen_q=7)  # planned
    kwargs = dict(max_seqlen_q=7) | bad
    with pytest.raises(Exception) as planned:
        attnhub.attention_forward_varlen(q, k, v, info, info, **kwargs)
    plans.clear()
    with pytest.raises(Exception) as fresh:
        attnhub.attention_forward_varlen(q, k, v, info, info, **kwargs)
    assert type(planned.value) is type(fresh.value)
    assert str(planned.value) == str(fresh.value)


def test_wrong_tensors_after_a_plan_still_raise():
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    attnhub.attention_forward_varlen(q, k, v, info, info)
    with pytest.raises(attnhub.InvalidArgumentError, match="argument 'k'"):
        attnhub.attention_forward_varlen(q, k.double(), v, info, info)
    with pytest.raises(attnhub.InvalidArgumentError, match="argument 'cu_seqlens_q'"):
        attnhub.attention_forward_varlen(q[:11], k, v, info, info)


def test_overrides_and_env_changes_are_honoured(install, monkeypatch):
    fast = make_backend("fast", 10)
    install(fast)
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    attnhub.attention_forward_varlen(q, k, v, info, info)
    assert fast.calls == ["forward"]
    with attnhub.use_backend("reference"):
        attnhub.attention_forward_varlen(q, k, v, info, info)
    assert fast.calls == ["forward"]
    monkeypatch.setenv("ATTNHUB_BACKEND", "reference")
    attnhub.attention_forward_varlen(q, k, v, info, info)
    assert fast.calls == ["forward"]
    monkeypatch.setenv("ATTNHUB_BACKEND", "nope")
    with pytest.raises(attnhub.UnknownBackendError):
        attnhub.attention_forward_varlen(q, k, v, info, info)
    monkeypatch.delenv("ATTNHUB_BACKEND")
    attnhub.attention_forward_varlen(q, k, v, info, info)
    assert fast.calls == ["forward", "forward"]


def test_registry_reset_forgets_plans(install):
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    attnhub.attention_forward_varlen(q, k, v, info, info)
    assert plans._plans
    fast = make_backend("fast", 10)
    install(fast)
    assert not plans._plans
    attnhub.attention_forward_varlen(q, k, v, info, info)
    assert fast.calls == ["forward"]


def test_grad_mode_is_part_of_the_key(counted):
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv(grad=True)
    out = attnhub.attention_forward_varlen(q, k, v, info, info)
    assert out.requires_grad
    with torch.no_grad():
        out = attnhub.attention_forward_varlen(q, k, v, info, info)
    assert not out.requires_grad and len(counted) == 2


def test_ineligible_calls_take_the_full_path(counted):
    q, k, v = _qkv()
    cu = [0, 5, 5, 12]
    for _ in range(2):  # host offsets are validated on every call
        attnhub.attention_forward_varlen(q, k, v, cu, cu)
        attnhub.attention_forward_varlen(q, k, v, torch.tensor(cu), torch.tensor(cu), 7, 7)
    assert len(counted) == 4
    assert plans._plans == {}


def test_out_only_calls_use_forward_out(install):
    class OutOnly(type(make_backend("x"))):
        name, priority, device_types = "out-only", 10, frozenset({"cpu"})
        capabilities = make_backend("x").capabilities

        def forward_out(self, problem, inputs):
            self.calls.append("forward_out")
            return super().forward_out(problem, inputs)

    backend = OutOnly()
    install(backend)
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    attnhub.attention_forward_varlen(q, k, v, info, info)
    attnhub.attention_forward_varlen(q, k, v, info, info, return_lse=True)
    assert backend.calls == ["forward_out", "forward", "forward"]


def test_plan_count_is_bounded():
    q, k, v = _qkv()
    for _ in range(plans.MAX_PLANS + 5):
        info = attnhub.VarlenInfo.from_lengths([5, 0, 7])  # a new layout object per step
        attnhub.attention_forward_varlen(q, k, v, info, info)
    assert len(plans._plans) == plans.MAX_PLANS


def test_alibi_and_sinks_calls_are_planned_with_their_own_values(counted):
    """ALiBi slopes and sinks join the key by shape, dtype, device and grad flag: repeated
    calls normalize once, and each call computes with its own values (equal to a fresh full
    path), forward and backward (sinks' gradient included)."""
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv(grad=True)
    results = []
    for scale in (1.0, 0.5, 0.5):
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625]) * scale
        sinks = (torch.tensor([0.3, -1.0, 2.0, 0.0]) * scale).requires_grad_()
        out, lse = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                                    alibi_slopes=slopes, sinks=sinks,
                                                    return_lse=True)
        grads = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sinks))
        results.append((out, lse, *grads))
    assert len(counted) == 1
    plans.clear()
    fresh_out, fresh_lse = attnhub.attention_forward_varlen(
        q, k, v, info, info, causal=True, alibi_slopes=torch.tensor([0.25, 0.125, 0.0625,
                                                                     0.03125]),
        sinks=torch.tensor([0.15, -0.5, 1.0, 0.0]), return_lse=True)
    assert torch.equal(results[1][0], fresh_out) and torch.equal(results[1][1], fresh_lse)
    assert not torch.equal(results[0][0], results[1][0])  # the values changed the output
    for a, b in zip(results[1], results[2], strict=True):
        assert torch.equal(a, b)


def test_alibi_and_sinks_keys_follow_what_normalize_checks(counted):
    """A slopes shape of another kind (per batch), sinks that start requiring grad, and
    sinks that are not contiguous (normalize copies them) each take the full path; wrong
    slopes after a plan still raise the full path's error."""
    info = attnhub.VarlenInfo.from_lengths([5, 0, 7])
    q, k, v = _qkv()
    head = torch.full((4,), 0.5)
    attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=head)
    attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=torch.full((3, 4), 0.5))
    assert len(counted) == 2
    sinks = torch.zeros(4)
    attnhub.attention_forward_varlen(q, k, v, info, info, sinks=sinks)
    attnhub.attention_forward_varlen(q, k, v, info, info, sinks=sinks.clone().requires_grad_())
    assert len(counted) == 4
    strided = torch.zeros(8)[::2]
    for _ in range(2):
        attnhub.attention_forward_varlen(q, k, v, info, info, sinks=strided)
    assert len(counted) == 6
    with pytest.raises(attnhub.InvalidArgumentError, match="alibi_slopes"):
        attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=head.double())
    with pytest.raises(attnhub.InvalidArgumentError, match="alibi_slopes"):
        attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=head[:3])
