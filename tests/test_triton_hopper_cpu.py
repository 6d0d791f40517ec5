"""The Gluon Hopper kernels stay out of calls they cannot serve: the modules import with any
Triton, and CPU tensors (or a Triton without Gluon) take the tl kernels."""

import torch

import attnhub
from attnhub.backends.triton import hopper_backward, hopper_forward
from attnhub.normalize import normalize


def test_cpu_calls_never_reach_the_gluon_kernels():
    lengths = [5, 0, 9]
    q = torch.randn(14, 4, 64, dtype=torch.float16)
    k = v = torch.randn(14, 2, 64, dtype=torch.float16)
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    problem, _ = normalize(q, k, v, info, info, causal=True)
    assert not hopper_forward.supports(problem, q, k, v, True)
    assert not hopper_backward.supports(problem, q, k, v, q, True)


def test_forward_hands_softcap_alibi_and_head_dim_256_calls_to_the_gluon_kernel(monkeypatch):
    """forward.forward's dispatch, with the Gluon launcher replaced by a recorder (Gluon
    cannot run here): softcap and ALiBi calls count as the Gluon kernel's features, dropout
    does not; at head dim 256 the tiles are planned with Gluon's 128 rows, not the tl
    kernel's; the score scalars and slopes reach the launcher."""
    from attnhub.backends.triton import forward

    asked, launched = [], []
    monkeypatch.setattr(hopper_forward, "supports",
                        lambda problem, q, k, v, plain: asked.append(plain) or plain)

    def recorder(problem, q, k, v, out, lse, cu_q, cu_k, tiles, scalars, sinks=None,
                 alibi=None, *, record=False):
        launched.append((tiles, scalars, alibi))
        return (None, ()) if record else None

    monkeypatch.setattr(hopper_forward, "forward", recorder)
    lengths = [5, 0, 300]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    q = torch.randn(305, 4, 256, dtype=torch.float16)
    k = v = torch.randn(305, 2, 256, dtype=torch.float16)
    slopes = torch.rand(4)
    for kw in ({"softcap": 5.0, "causal": True}, {"alibi_slopes": slopes}):
        problem, inputs = normalize(q, k, v, info, info, **kw)
        forward.forward(problem, inputs, None)
        assert asked.pop() is True
        (programs, tile_seq, tile_blk, device_tiles), scalars, alibi = launched.pop()
        assert (programs, device_tiles) == (1 + 3, False)  # cdiv(5, 128) + cdiv(300, 128)
        tiles = sorted(zip(tile_seq.tolist(), tile_blk.tolist(), strict=True))
        assert tiles == [(0, 0), (2, 0), (2, 1), (2, 2)]
        assert scalars == forward.score_scalars(problem)
        assert alibi is inputs.alibi_slopes
    one = attnhub.VarlenInfo.from_lengths([5], "cpu")
    problem, inputs = normalize(q[:5], k[:5], v[:5], one, one, dropout_p=0.5)
    forward.forward(problem, inputs, torch.zeros(2, dtype=torch.int64))  # the tl kernel
    assert asked == [False] and not launched  # dropout: not one of Gluon's features
