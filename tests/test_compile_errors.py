"""Under torch.compile (fullgraph too) a bad call raises attnhub's own error, with eager's
type and message, when the compiled code runs, instead of dynamo's Unsupported."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backend

import attnhub
from attnhub import BackendUnavailableError, InvalidArgumentError, UnknownBackendError

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

CU = [0, 3, 8]


def _args(**overrides):
    q = torch.randn(8, 4, 16)
    k = torch.randn(8, 2, 16)
    args = dict(q=q, k=k, v=k.clone(), cu_seqlens_q=torch.tensor(CU, dtype=torch.int32),
                cu_seqlens_k=torch.tensor(CU, dtype=torch.int32), max_seqlen_q=5,
                max_seqlen_k=5)
    args.update(overrides)
    return args


BAD = {
    "softcap": dict(softcap=-1.0),
    "window": dict(window_size=(-3, 2)),
    "k-dtype": dict(k=torch.randn(8, 2, 16, dtype=torch.float64),
                    v=torch.randn(8, 2, 16, dtype=torch.float64)),
    "cu-2d": dict(cu_seqlens_q=torch.tensor([CU], dtype=torch.int32)),
    "max-negative": dict(max_seqlen_q=-1),
    "head-dim": dict(k=torch.randn(8, 2, 8), v=torch.randn(8, 2, 8)),
    "unknown-backend": dict(backend="no-such-backend"),
}


def _call(args, **kw):
    return attnhub.attention_forward_varlen(**args, **kw)


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_fullgraph_raises_the_eager_error(case, dynamic):
    args = _args(**BAD[case])
    with pytest.raises(attnhub.AttnhubError) as eager:
        _call(args)
    compiled = torch.compile(_call, backend="eager", fullgraph=True, dynamic=dynamic)
    for _ in range(2):  # when traced, and again from the compiled graph
        with pytest.raises(type(eager.value)) as got:
            compiled(args)
        assert type(got.value) is type(eager.value)
        assert str(got.value) == str(eager.value)
    if isinstance(eager.value, InvalidArgumentError):
        assert got.value.argument == eager.value.argument
    if isinstance(eager.value, UnknownBackendError):
        assert got.value.valid == eager.value.valid


def test_error_raised_even_when_the_output_is_unused():
    def discard(args):
        attnhub.attention_forward_varlen(**args)
        return args["q"] * 2

    with pytest.raises(InvalidArgumentError, match="softcap"):
        torch.compile(discard, backend="eager", fullgraph=True)(_args(softcap=-2.0))


def test_return_lse_call_raises_too():
    compiled = torch.compile(_call, backend="eager", fullgraph=True)
    with pytest.raises(InvalidArgumentError, match="softcap"):
        compiled(_args(softcap=-2.0), return_lse=True)


def test_a_corrected_call_compiles_and_runs():
    compiled = torch.compile(_call, backend="eager", fullgraph=True)
    with pytest.raises(InvalidArgumentError):
        compiled(_args(softcap=-1.0))
    args = _args(softcap=2.0)
    torch.testing.assert_close(compiled(args), _call(args))


def test_forced_backend_that_cannot_run(install):
    fp16 = make_backend("fp16", 20, dtypes=(torch.float16,))
    install(fp16)
    compiled = torch.compile(_call, backend="eager", fullgraph=True)
    with pytest.raises(BackendUnavailableError) as exc_info:
        compiled(_args(), backend="fp16")
    assert "backend 'fp16' (forced by the backend= argument) cannot run" in str(exc_info.value)
