"""Replayed Triton launches (backends/triton/replay.py): the cache's bookkeeping on the CPU;
on a CUDA GPU, replays give the bitwise results of a fresh launch for each kernel (tl with
pointer loads, tl with TMA, Gluon; host lengths or device offsets; plain, softcap and head
dim 256 calls), with new tensors every call, and a call whose tensors differ in what the
record assumed (strides, alignment) takes the full launch.

Run the GPU part on the device machine: python -m pytest -m gpu tests/test_triton_replay.py
"""

import pytest
import torch

import attnhub
from attnhub.backends.triton import forward as triton_forward
from attnhub.backends.triton import replay


class Problem:  # any object: the cache keys by identity
    pass


def test_a_problem_is_recorded_at_its_second_sighting_and_replayed_after():
    cache = replay.ReplayCache()
    p = Problem()
    assert cache.get(p, ("k",)) is None  # first: noted only
    assert cache.get(p, ("k",)) is True  # second: record now
    cache.put(p, ("k",), "record")
    assert cache.get(p, ("k",)) == "record"
    assert cache.get(p, ("other",)) is True  # a new key of a known problem records at once
    cache.put(p, ("other",), None)  # not replayable
    assert cache.get(p, ("other",)) is None


def test_the_cache_compares_problems_by_identity_and_forgets_the_oldest():
    cache = replay.ReplayCache()
    first = Problem()
    cache.get(first, ())
    assert cache.get(first, ()) is True
    for _ in range(replay.MAX_PROBLEMS):
        cache.get(Problem(), ())
    assert cache.get(first, ()) is None  # evicted: a first sighting again
    other = Problem()
    cache.get(other, ())
    cache.put(Problem(), (), "stray")  # an unknown problem stores nothing
    assert cache.get(other, ()) is True


def test_a_repeating_record_passes_tensors_again_for_its_extra_slots():
    """LaunchRecord.repeating: the call's tensors, then those at the given positions again
    (a kernel that reads q, k and v through two descriptors each)."""
    seen = []
    record = replay.LaunchRecord.__new__(replay.LaunchRecord)
    repeating = replay._Repeating(lambda *tensors: seen.append(tensors) or True, (0, 2))
    assert repeating("q", "k", "v", "out") is True
    assert seen == [("q", "k", "v", "out", "q", "v")]
    assert isinstance(record.repeating(1), replay._Repeating)


def test_optional_slots_are_the_kernels_parameters():
    """replay.present names the optional slots a record replaces (ALiBi slopes, sinks, the
    dQ kernel's row sums for dsinks) by their parameter names in the tl kernels (a name a
    kernel lacked would make recording fail, and the call launch in full every time)."""
    from attnhub.backends.triton import backward as triton_backward

    slopes, sinks = torch.ones(2), torch.zeros(2)
    assert replay.present(Alibi=None, Sinks=None) == ((), ())
    names, tensors = replay.present(Alibi=slopes, Sinks=sinks)
    assert names == ("Alibi", "Sinks") and tensors[0] is slopes and tensors[1] is sinks
    assert replay.present(Alibi=None, RowPdP=sinks)[0] == ("RowPdP",)
    for kernel, optional in ((triton_forward._fwd_kernel, ("Alibi", "Sinks")),
                             (triton_backward._dkdv_kernel, ("Alibi",)),
                             (triton_backward._dq_kernel, ("Alibi", "RowPdP"))):
        params = getattr(kernel, "fn", kernel).arg_names
        assert set(optional) <= set(params), kernel


def test_a_backward_replay_passes_its_optional_slots_in_record_order():
    """BackwardReplay.launch: each record gets the call's tensors, then the optional slots it
    was recorded with (the tl dQ's ALiBi slopes and dsinks row sums; none for a record
    without them)."""
    from attnhub.backends.triton import backward as triton_backward

    seen = {}

    def record(name):
        return lambda *tensors: seen.setdefault(name, tensors) is not None

    base = tuple(f"t{i}" for i in range(13))  # q ... cu_k
    plain = triton_backward.BackwardReplay(record("delta"), record("dkdv"), record("dq"))
    assert plain.launch(*base, "slopes", "rows")
    assert seen["dkdv"][10:] == () and seen["dq"][9:] == ()
    seen.clear()
    featured = triton_backward.BackwardReplay(record("delta"), record("dkdv"), record("dq"),
                                              ("Alibi",), ("Alibi", "RowPdP"))
    assert featured.launch(*base, "slopes", "rows")
    assert seen["dkdv"][10:] == ("slopes",) and seen["dq"][9:] == ("slopes", "rows")


def test_aligned_and_rebased_descriptor():
    from dataclasses import dataclass

    @dataclass
    class Descriptor:
        base: object
        shape: list
        strides: list

    t = torch.zeros(64, dtype=torch.float32)
    assert replay.aligned(t, t[4:])
    assert not replay.aligned(t, t[1:])
    template = Descriptor(t, [8, 8], [8, 1])
    copy = replay.rebased(template, t[4:])
    assert copy.base.data_ptr() == t[4:].data_ptr() and copy.shape == [8, 8]
    assert template.base is t


def test_the_out_only_runner_replays_the_recorded_launch_first(monkeypatch):
    """A plan's out-only runner launches the forward recorded for its problem, with the
    call's tensors, and a problem without a record falls through without being marked seen
    (peek)."""
    from attnhub.backends.triton import configs
    from attnhub.backends.triton.backend import TritonBackend

    lengths = [5, 0, 30]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    q = torch.randn(35, 4, 64, dtype=torch.float16)
    k = v = torch.randn(35, 2, 64, dtype=torch.float16)
    problem, inputs = attnhub.normalize(q, k, v, info, info, causal=True)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    run = TritonBackend().out_only_runner(problem)
    cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
    triton_forward._replays.clear()
    assert triton_forward.replay_out(problem, q, k, v, cu_q, cu_k) is None
    assert triton_forward._replays.peek(problem, ()) is None  # still never seen
    launched = []

    class Record:
        def launch(self, *tensors):
            launched.append(tensors)
            return True

    key = triton_forward._replay_key(q, k, v, gluon=True, tma=True)
    triton_forward._replays.get(problem, key)
    assert triton_forward._replays.peek(problem, key) is True  # seen, not recorded
    triton_forward._replays.put(problem, key, Record())
    out = run(q, k, v, cu_q, cu_k)
    (r_q, r_k, r_v, r_out, r_lse, r_cu_q, r_cu_k, features), = launched
    assert features == ()  # no ALiBi slopes or sinks
    assert r_q is q and r_k is k and r_v is v and r_out is out
    assert out.shape == q.shape and r_lse.shape == (4, 35)
    assert r_cu_q is cu_q and r_cu_k is cu_k
    triton_forward._replays.clear()


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _take_forward(monkeypatch, gluon: bool, tma: bool):
    """triton_forward.forward with ``gluon`` and ``tma`` as given on every call (the test
    skips where ``gluon`` asks for the Gluon forward and it does not run). The tests'
    sequences are short: the calls the tl forward was measured faster on
    (hopper_forward.tl_is_faster) take the Gluon kernel too where it runs."""
    from attnhub.backends.triton import hopper_forward

    if gluon and (not hopper_forward.available() or not hopper_forward.is_sm90(None)):
        pytest.skip("the Gluon forward runs on sm_90")
    monkeypatch.setattr(hopper_forward, "TL_BELOW", {})
    monkeypatch.setattr(hopper_forward, "TL_SOFTCAP_DEVICE_OFFSETS", ())
    original = triton_forward.forward
    monkeypatch.setattr(triton_forward, "forward",
                        lambda *a, **kw: original(*a, **{**kw, "gluon": gluon, "tma": tma}))


def _inputs(lengths, seed, head_dim=128):
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(lengths)
    q = torch.randn(total, 8, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    k = torch.randn(total, 2, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    v = torch.randn(total, 2, head_dim, device="cuda", dtype=torch.bfloat16, generator=g)
    return q, k, v


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("path", ["tl", "tl-tma", "gluon"])
@pytest.mark.parametrize("offsets", ["varlen-info", "device"])
@pytest.mark.parametrize("feature", ["plain", "softcap", "d256", "d96"])
def test_replayed_launches_match_fresh_launches(path, offsets, feature, monkeypatch):
    gluon, tma = path == "gluon", path == "tl-tma"
    _take_forward(monkeypatch, gluon, tma)
    lengths = [64, 1, 200, 0, 130]
    total = sum(lengths)
    if offsets == "varlen-info":
        info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
        args = (info, info)
    else:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                          dtype=torch.int32)
        args = (cu, cu, max(lengths), max(lengths))
    kw = {"softcap": 20.0} if feature == "softcap" else {}
    head_dim = {"d256": 256, "d96": 96}.get(feature, 128)  # d96: two column chunks
    calls = []
    for seed in range(5):  # new tensors each call: 1st and 2nd launch fully, then replays
        q, k, v = _inputs(lengths, seed, head_dim)
        out, lse = attnhub.attention_forward_varlen(q, k, v, *args, causal=True,
                                                    return_lse=True, backend="triton", **kw)
        calls.append(((q, k, v), out.clone(), lse.clone()))
    records = [r for p, recs in triton_forward._replays._entries.values()
               if (p.total_q, p.head_dim, p.softcap) == (total, head_dim, kw.get("softcap", 0))
               for r in recs.values()]
    assert any(isinstance(r, triton_forward.ForwardReplay) and r.gluon == gluon
               for r in records)
    triton_forward._replays.clear()  # fresh launches of the same calls
    for (q, k, v), out, lse in calls:
        fresh_out, fresh_lse = triton_forward.forward(
            *_problem_and_inputs(q, k, v, args, **kw), None)
        assert torch.equal(out, fresh_out)
        assert torch.equal(lse, fresh_lse)


def _problem_and_inputs(q, k, v, args, **kw):
    from attnhub.normalize import normalize

    return normalize(q, k, v, *args, causal=True, **kw)


@pytest.mark.gpu
@needs_gpu
def test_a_call_unlike_the_record_takes_the_full_launch():
    lengths = [100, 37, 256]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    q, k, v = _inputs(lengths, 0)
    ref = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                           backend="reference")
    for _ in range(3):  # recorded and replayed
        out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                               backend="triton")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    # k and v as views of one (total, 2, 2, d) tensor: other strides than the record's
    kv = torch.stack((k, v), dim=1).contiguous()
    out = attnhub.attention_forward_varlen(q, kv[:, 0], kv[:, 1], info, info, causal=True,
                                           backend="triton")
    assert (out.float() - ref.float()).abs().max() < 2e-2
    # a q at an address that is not 16-byte aligned: same shape and strides
    buf = torch.empty(q.numel() + 1, dtype=q.dtype, device="cuda")
    q_odd = buf[1:].view(q.shape)
    q_odd.copy_(q)
    out = attnhub.attention_forward_varlen(q_odd, k, v, info, info, causal=True,
                                           backend="triton")
    assert (out.float() - ref.float()).abs().max() < 2e-2


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("causal", [True, False])  # causal: the Gluon dK/dV kernel on sm_90
@pytest.mark.parametrize("offsets", ["varlen-info", "device"])
@pytest.mark.parametrize("with_lse", [False, True])  # dlse reaches the delta kernel
@pytest.mark.parametrize("head_dim", [128, 96])  # 96: two column chunks in the Gluon kernels
def test_replayed_backward_matches_fresh_backward(causal, offsets, with_lse, head_dim):
    from attnhub.backends.triton import backward as triton_backward

    lengths = [64, 1, 200, 0, 130]
    total = sum(lengths)
    if offsets == "varlen-info":
        info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
        args = (info, info)
    else:
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], device="cuda",
                          dtype=torch.int32)
        args = (cu, cu, max(lengths), max(lengths))

    def grads(q, k, v, seed):
        g = torch.Generator(device="cuda").manual_seed(100 + seed)
        q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
        out, lse = attnhub.attention_forward_varlen(q, k, v, *args, causal=causal,
                                                    return_lse=True, backend="triton")
        dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
        loss_terms = [(out, dout)]
        if with_lse:
            loss_terms.append((lse, torch.randn(lse.shape, device="cuda", generator=g)))
        outputs, cotangents = zip(*loss_terms, strict=True)
        return torch.autograd.grad(outputs, (q, k, v), cotangents)

    inputs = [_inputs(lengths, seed, head_dim) for seed in range(5)]
    replayed = [grads(*qkv, seed) for seed, qkv in enumerate(inputs)]
    records = [r for p, recs in triton_backward._replays._entries.values()
               if (p.total_q, p.causal, p.head_dim) == (total, causal, head_dim)
               for r in recs.values()]
    assert any(isinstance(r, triton_backward.BackwardReplay) for r in records)
    triton_backward._replays.clear()
    from attnhub import plans

    plans.clear()  # new problem objects: every call launches in full
    for seed, qkv in enumerate(inputs):
        fresh = grads(*qkv, seed)
        plans.clear()
        for a, b in zip(replayed[seed], fresh, strict=True):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("feature", ["alibi", "alibi-batch", "sinks"])
@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("path", ["tl", "gluon"])
def test_replayed_feature_calls_match_fresh_calls(feature, backward, path, monkeypatch):
    """With replay.FEATURES: calls with ALiBi slopes ((nheads,) or (batch, nheads)) or sinks,
    new slopes / sinks every call, replay their forward (and backward) launches on the tl
    and (sm_90) the Gluon forward, and give bitwise the out, lse and gradients (dsinks too)
    of fresh launches."""
    from attnhub import plans
    from attnhub.backends.triton import backward as triton_backward

    gluon = path == "gluon"
    _take_forward(monkeypatch, gluon, tma=True)
    monkeypatch.setattr(replay, "FEATURES", True)
    lengths = [64, 1, 200, 0, 130]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")

    def call(seed):
        q, k, v = _inputs(lengths, seed)
        g = torch.Generator(device="cuda").manual_seed(50 + seed)
        if feature == "sinks":
            kw = {"sinks": torch.randn(8, device="cuda", generator=g)}
        else:
            shape = (8,) if feature == "alibi" else (len(lengths), 8)
            kw = {"alibi_slopes": torch.rand(shape, device="cuda", generator=g)}
        leaves = (q, k, v, *kw.values())
        if backward:
            for t in leaves[:3] + (leaves[3:] if feature == "sinks" else ()):
                t.requires_grad_()
        out, lse = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                                    return_lse=True, backend="triton", **kw)
        if not backward:
            return out, lse
        dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=g)
        wrt = leaves if feature == "sinks" else leaves[:3]
        return (out, lse, *torch.autograd.grad(out, wrt, dout))

    plans.clear()
    triton_forward._replays.clear()
    triton_backward._replays.clear()
    replayed = [call(seed) for seed in range(5)]
    assert any(isinstance(r, triton_forward.ForwardReplay) and r.gluon == gluon
               for _, recs in triton_forward._replays._entries.values() for r in recs.values())
    if backward:
        assert any(isinstance(r, triton_backward.BackwardReplay)
                   for _, recs in triton_backward._replays._entries.values()
                   for r in recs.values())
    for seed in range(5):  # every call a first sighting: launched in full
        plans.clear()
        triton_forward._replays.clear()
        triton_backward._replays.clear()
        fresh = call(seed)
        for a, b in zip(replayed[seed], fresh, strict=True):
            assert torch.equal(a, b)
