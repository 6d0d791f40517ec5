"""torch.compile(fullgraph=True) through attnhub, recompilation, and torch.library.opcheck of
the attnhub::varlen_fwd custom op."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backend

import attnhub
from attnhub import VarlenInfo, ops
from attnhub.inputs import VarlenInputs

torch._dynamo.config.cache_size_limit = 64

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

NHEADS, NHEADS_K, D = 4, 2, 8
WIDTH = NHEADS * D


class CountingBackend:
    """A torch.compile backend that counts compilations and runs the graph through AOT autograd
    (so the op's fake implementation and its autograd formula are traced) with eager kernels."""

    def __init__(self):
        self.compiles = 0
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.compiles += 1
        self.graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


class Block(torch.nn.Module):
    """qkv projection -> packed attention (GQA) -> output projection."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(WIDTH, NHEADS * D)
        self.kv = torch.nn.Linear(WIDTH, 2 * NHEADS_K * D)
        self.o = torch.nn.Linear(NHEADS * D, WIDTH)

    def forward(self, x, cu_q, cu_k, max_q=None, max_k=None):
        q = self.q(x).view(-1, NHEADS, D)
        k, v = self.kv(x).view(-1, 2, NHEADS_K, D).unbind(1)
        out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal=True)
        return self.o(out.reshape(-1, NHEADS * D)) + x


def _run(model, fn, x, *args):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x, *args)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad for p in model.parameters()]


def _assert_same(got, want):
    y, gx, gp = got
    y_e, gx_e, gp_e = want
    torch.testing.assert_close(y, y_e)
    torch.testing.assert_close(gx, gx_e)
    for a, b in zip(gp, gp_e, strict=True):
        torch.testing.assert_close(a, b)


def _graph_ops(backend):
    return [str(n.target) for gm in backend.graphs for n in gm.graph.nodes
            if n.op == "call_function"]


def test_compiled_block_with_cu_tensor_matches_eager_without_recompiling():
    torch.manual_seed(0)
    model = Block()
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(12, WIDTH)
    # Same total, same max_seqlen bound, a new cu tensor with other lengths: one compilation.
    for cu_values in ([0, 5, 12], [0, 6, 12], [0, 7, 12]):
        cu = torch.tensor(cu_values, dtype=torch.int32)
        got = _run(model, compiled, x, cu, cu, 7, 7)
        _assert_same(got, _run(model, model, x, cu, cu, 7, 7))
    assert counter.compiles == 1
    assert any("attnhub.varlen_fwd" in t for t in _graph_ops(counter))
    # Another batch size (cu's shape) may compile again, and still matches eager.
    for cu_values in ([0, 7, 9, 12], [0, 1, 8, 8, 12]):
        cu = torch.tensor(cu_values, dtype=torch.int32)
        got = _run(model, compiled, x, cu, cu, 7, 7)
        _assert_same(got, _run(model, model, x, cu, cu, 7, 7))


def test_compiled_block_with_varlen_info_matches_eager():
    torch.manual_seed(1)
    model = Block()
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(10, WIDTH)
    info_q = VarlenInfo.from_lengths([4, 0, 6])
    info_k = VarlenInfo.from_lengths([4, 0, 6])
    got = _run(model, compiled, x, info_q, info_k)
    _assert_same(got, _run(model, model, x, info_q, info_k))
    got = _run(model, compiled, x, info_q, info_k, 16, 16)  # explicit upper bounds
    _assert_same(got, _run(model, model, x, info_q, info_k, 16, 16))
    assert 1 <= counter.compiles <= 2
    assert any("attnhub.varlen_fwd" in t for t in _graph_ops(counter))


def _batches(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for batch in sizes:
        lengths = torch.randint(1, 10, (batch,), generator=gen).tolist()
        yield lengths, torch.randn(sum(lengths), WIDTH, generator=gen)


@pytest.mark.parametrize("max_given", [False, True], ids=["max-from-info", "max-given"])
def test_varlen_info_compiles_at_most_twice_over_twelve_batch_sizes(max_given):
    """A VarlenInfo costs what tensor offsets cost: one graph, and one more once the token
    count turns dynamic, whatever the batch size (the host lengths are not traced; without
    max_seqlen the info's power-of-two bound of it is)."""
    torch.manual_seed(4)
    model = Block()
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():  # (graph counts; gradients through the op: the tests above)
        for lengths, x in _batches(range(1, 13)):
            info = VarlenInfo.from_lengths(lengths)
            bounds = (16, 16) if max_given else ()
            torch.testing.assert_close(compiled(x, info, info, *bounds),
                                       model(x, info, info, *bounds))
    assert counter.compiles <= 2


def test_list_offsets_compile_once_per_batch_size():
    """A Python list's length is a guard of dynamo's: one graph per batch size, not per step
    (the offsets themselves are not specialized)."""
    torch.manual_seed(5)
    model = Block()
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    steps = 0
    with torch.no_grad():
        for lengths, x in _batches([3, 3, 3, 3, 5, 5, 5, 5]):
            cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
            torch.testing.assert_close(compiled(x, cu, cu, 16, 16), model(x, cu, cu, 16, 16))
            steps += 1
    assert counter.compiles <= 4 < steps


def test_changing_float_arguments_do_not_break_tracing():
    """softcap / softmax_scale / dropout_p passed as changing floats (dynamo makes them
    dynamic) are specialized in normalize: each value is a constant of its graph."""
    def fn(q, k, v, cu, cap, scale):
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, 4, 4, softcap=cap,
                                                softmax_scale=scale)

    q, k, v = torch.randn(6, NHEADS, D), torch.randn(6, NHEADS_K, D), torch.randn(6, NHEADS_K, D)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    for dynamic in (None, True):
        compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)
        for cap, scale in ((2.0, 0.3), (3.0, 0.5), (4.5, 0.25)):
            torch.testing.assert_close(compiled(q, k, v, cu, cap, scale),
                                       fn(q, k, v, cu, cap, scale))


def test_no_graph_break_counters():
    from torch._dynamo.utils import counters

    counters.clear()
    torch.manual_seed(2)
    model = Block()
    x = torch.randn(6, WIDTH)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    compiled = torch.compile(model, backend="eager")  # not fullgraph: breaks would be counted
    torch.testing.assert_close(compiled(x, cu, cu, 4, 4), model(x, cu, cu, 4, 4))
    assert sum(counters["graph_break"].values()) == 0
    assert counters["stats"]["unique_graphs"] == 1


def test_selection_under_compile_follows_use_backend(install):
    fast, forced = make_backend("fast", 20), make_backend("forced", 10)
    install(fast, forced)
    counter = CountingBackend()

    def inner(q, k, v, cu):
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, 4, 4)

    def with_context(q, k, v, cu):
        with attnhub.use_backend("forced"):
            return attnhub.attention_forward_varlen(q, k, v, cu, cu, 4, 4)

    torch.manual_seed(3)
    q, k, v = (torch.randn(6, NHEADS, D), torch.randn(6, NHEADS_K, D),
               torch.randn(6, NHEADS_K, D))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    want = attnhub.attention_forward_varlen(q, k, v, cu, cu, backend="reference")
    fast.calls.clear()

    compiled = torch.compile(inner, backend=counter, fullgraph=True)
    with attnhub.use_backend("forced"):
        torch.testing.assert_close(compiled(q, k, v, cu), want)
        assert attnhub.explain(q, k, v, cu, cu, 4, 4).selected == "forced"
    assert forced.calls == ["forward"] and fast.calls == []
    # Outside the context the decision is not stale: the auto choice runs.
    torch.testing.assert_close(compiled(q, k, v, cu), want)
    assert fast.calls == ["forward"] and forced.calls == ["forward"]
    assert attnhub.explain(q, k, v, cu, cu, 4, 4).selected == "fast"

    forced.calls.clear()
    compiled_ctx = torch.compile(with_context, backend=counter, fullgraph=True)
    torch.testing.assert_close(compiled_ctx(q, k, v, cu), want)
    assert forced.calls == ["forward"]


def test_forced_backend_that_cannot_run_fails_under_compile(install):
    """Selection runs at trace time; a forced backend that cannot run fails the call with
    its reasons (attnhub's own error, not dynamo's) and nothing falls back."""
    fp16, other = make_backend("fp16", 20, dtypes=(torch.float16,)), make_backend("other", 5)
    install(fp16, other)

    def fn(q, cu):
        return attnhub.attention_forward_varlen(q, q, q, cu, cu, 4, 4, backend="fp16")

    q = torch.randn(6, NHEADS, D)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(attnhub.BackendUnavailableError) as exc_info:
        torch.compile(fn, backend="eager", fullgraph=True)(q, cu)
    message = str(exc_info.value)
    assert "backend 'fp16' (forced by the backend= argument) cannot run this call" in message
    assert "dtype float32 is not supported (supported: float16)" in message
    assert fp16.calls == [] and other.calls == []


# -- opcheck -------------------------------------------------------------------------------------

def _op_args(q, k, v, cu_q, cu_k, max_q, max_k, *, alibi=None, block_table=None, seed=None,
             window=(-1, -1), softcap=0.0, dropout_p=0.0, top_left=False, return_probs=False,
             seqlens_q=None, seqlens_k=None, sinks=None):
    """varlen_fwd's arguments, packed as attnhub packs them (ops.pack, from the feature
    table)."""
    tensors = dict(alibi_slopes=alibi, block_table=block_table, rng_state=seed, sinks=sinks)
    fields = dict(window=window, causal=window[1] == 0, softcap=softcap, dropout_p=dropout_p,
                  mask_alignment="top_left" if top_left else "bottom_right",
                  return_probs=return_probs,
                  alibi=None if alibi is None else ("head" if alibi.dim() == 1 else "batch_head"))
    problem = ops.problem_from_op_args(q, k, cu_q, tensors, max_q, max_k, q.shape[-1] ** -0.5,
                                       q.requires_grad, seqlens_q, seqlens_k, fields)
    return ops.pack(problem, VarlenInputs(q, k, v, cu_q, cu_k, **tensors), "reference")


SEED = torch.tensor([11, 22], dtype=torch.int64)


def _t(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


def _opcheck_cases():
    """name -> (the op's arguments, the same call through attention_forward_varlen or None)."""
    torch.manual_seed(4)
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 5, 8], dtype=torch.int32)
    q, k, v = _t(8, 4, 16), _t(8, 2, 16), _t(8, 2, 16)
    k4, v4 = _t(8, 4, 16), _t(8, 4, 16)
    pool_k, pool_v = _t(6, 4, 2, 16), _t(6, 4, 2, 16)
    table = torch.tensor([[5, 0], [1, 2], [3, 4]], dtype=torch.int32)
    cu_paged = torch.tensor([0, 7, 7, 12], dtype=torch.int32)
    slopes, slopes_b = torch.rand(4), torch.rand(3, 4)
    sinks = torch.randn(4, requires_grad=True)
    nq, nk, nv = _t(8, 4, 16, grad=False), _t(8, 2, 16, grad=False), _t(8, 2, 16, grad=False)
    return {
        "gqa-causal": (_op_args(q, k, v, cu, cu, 5, 5, window=(-1, 0)),
                       dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True)),
        "mha-window-softcap": (
            _op_args(q, k4, v4, cu, cu, 5, 5, window=(2, 1), softcap=3.0),
            dict(q=q, k=k4, v=v4, cu_seqlens_q=cu, cu_seqlens_k=cu, window_size=(2, 1),
                 softcap=3.0)),
        "alibi-host-lengths": (
            _op_args(q, k, v, cu, cu, 5, 5, alibi=slopes, seqlens_q=[3, 0, 5],
                     seqlens_k=[3, 0, 5]),
            dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, alibi_slopes=slopes)),
        "alibi-batch-top-left": (
            _op_args(q, k, v, cu, cu_k, 5, 4, alibi=slopes_b, window=(-1, 0), top_left=True),
            dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu_k, alibi_slopes=slopes_b,
                 causal=True, mask_alignment="top_left")),
        "paged-causal": (
            _op_args(q, pool_k, pool_v, cu, cu_paged, 5, 7, block_table=table, window=(-1, 0)),
            dict(q=q, k=pool_k, v=pool_v, cu_seqlens_q=cu, cu_seqlens_k=cu_paged,
                 block_table=table, causal=True)),
        "dropout-seeded": (_op_args(q, k, v, cu, cu, 5, 5, dropout_p=0.25, seed=SEED), None),
        "sinks-gqa-causal": (
            _op_args(q, k, v, cu, cu, 5, 5, window=(-1, 0), sinks=sinks),
            dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, causal=True, sinks=sinks)),
        "probs-no-grad": (_op_args(nq, nk, nv, cu, cu, 5, 5, return_probs=True),
                          dict(q=nq, k=nk, v=nv, cu_seqlens_q=cu, cu_seqlens_k=cu,
                               return_attn_probs=True)),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck_varlen_fwd(case):
    args, public = _opcheck_cases()[case]
    result = torch.library.opcheck(torch.ops.attnhub.varlen_fwd.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    out, lse, probs, rng = torch.ops.attnhub.varlen_fwd.default(*args)
    assert out.shape == args[0].shape and out.dtype == torch.float64
    assert lse.shape == (4, 8) and lse.dtype == torch.float32
    if public is None:  # seeded dropout: the seed comes back (a copy), the result is repeatable
        assert torch.equal(rng, SEED) and rng is not SEED
        torch.testing.assert_close(torch.ops.attnhub.varlen_fwd.default(*args)[0], out,
                                   rtol=0, atol=0)
        return
    want = attnhub.attention_forward_varlen(**public, return_lse=True)
    if public.get("return_attn_probs"):
        torch.testing.assert_close(probs, want[2])
    torch.testing.assert_close(out, want[0])
    torch.testing.assert_close(lse, want[1])


def test_attnhub_backend_set_after_compiling_is_honoured(install, monkeypatch):
    """The compiled function guards the environment variables that selection reads: setting
    ATTNHUB_BACKEND after compiling recompiles with the forced backend."""
    fast, forced = make_backend("fast", 20), make_backend("forced", 10)
    install(fast, forced)
    q = torch.randn(6, NHEADS, D)
    k = torch.randn(6, NHEADS_K, D)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    compiled = torch.compile(lambda q, k: attnhub.attention_forward_varlen(q, k, k, cu, cu, 4, 4),
                             backend="eager", fullgraph=True)
    compiled(q, k)
    assert fast.calls == ["forward"] and forced.calls == []
    monkeypatch.setenv("ATTNHUB_BACKEND", "forced")
    compiled(q, k)
    assert forced.calls == ["forward"]
    monkeypatch.setenv("ATTNHUB_BACKEND", "no-such-backend")
    with pytest.raises(attnhub.UnknownBackendError):
        compiled(q, k)
