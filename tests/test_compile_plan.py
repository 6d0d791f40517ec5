"""torch.compile(fullgraph=True) of a small transformer block calling attnhub through the
plain API and through a plan's run(): no graph break, no recompile when only the lengths
change (max_seqlen given as an upper bound), gradients equal to eager."""

from __future__ import annotations

import pytest
import torch
from test_compile import CountingBackend

import attnhub

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

NHEADS, NHEADS_K, D = 4, 2, 8
WIDTH = NHEADS * D


class Block(torch.nn.Module):
    """norm -> qkv -> packed causal attention -> out projection -> MLP, residuals."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(WIDTH)
        self.qkv = torch.nn.Linear(WIDTH, (NHEADS + 2 * NHEADS_K) * D)
        self.o = torch.nn.Linear(WIDTH, WIDTH)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(WIDTH, 2 * WIDTH), torch.nn.GELU(),
                                       torch.nn.Linear(2 * WIDTH, WIDTH))

    def attend(self, q, k, v, layout):
        if isinstance(layout, attnhub.BatchPlan):
            return layout.run(q, k, v)
        cu, max_len = layout
        return attnhub.attention_forward_varlen(q, k, v, cu, cu, max_len, max_len, causal=True)

    def forward(self, x, layout):
        q, k, v = self.qkv(self.norm(x)).split([NHEADS * D, NHEADS_K * D, NHEADS_K * D], -1)
        a = self.attend(q.reshape(-1, NHEADS, D), k.reshape(-1, NHEADS_K, D),
                        v.reshape(-1, NHEADS_K, D), layout)
        x = x + self.o(a.reshape(-1, WIDTH))
        return x + self.mlp(x)


def _step(model, fn, x, layout):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = fn(x, layout)
    y.square().sum().backward()
    return [y.detach(), x.grad, *[p.grad for p in model.parameters()]]


@pytest.mark.parametrize("surface", ["plain", "plan"])
def test_block_compiles_once_for_new_lengths(surface):
    torch.manual_seed(0)
    model = Block()
    counter = CountingBackend()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    x = torch.randn(12, WIDTH)
    for lengths in ([5, 7], [6, 6], [1, 11]):
        cu = torch.tensor([0, lengths[0], 12], dtype=torch.int32)
        if surface == "plan":
            layout = attnhub.plan(cu, cu, nheads=NHEADS, nheads_k=NHEADS_K, head_dim=D,
                                  dtype=torch.float32, max_seqlen_q=12, max_seqlen_k=12,
                                  causal=True)
        else:
            layout = (cu, 12)
        got = _step(model, compiled, x, layout)
        want = _step(model, model, x, layout)
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b)
    assert counter.compiles == 1
    ops = [str(n.target) for gm in counter.graphs for n in gm.graph.nodes
           if n.op == "call_function"]
    assert any("attnhub.varlen_fwd" in t for t in ops)
