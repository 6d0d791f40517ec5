"""The feature table (attnhub.features) is the one declaration: VarlenProblem, VarlenInputs,
Capabilities, normalize and the custom ops' schemas all follow it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import attnhub
from attnhub import features, ops


def test_every_declaration_reaches_every_structure():
    problem_fields = {f.name for f in dataclasses.fields(attnhub.VarlenProblem)}
    input_fields = {f.name for f in dataclasses.fields(attnhub.VarlenInputs)}
    caps = attnhub.Capabilities(dtypes=frozenset({torch.float32}))
    fwd = str(torch.ops.attnhub.varlen_fwd.default._schema)
    bwd = str(torch.ops.attnhub.varlen_bwd.default._schema)
    for feature in features.FEATURES:
        for field in feature.fields:
            assert field.name in problem_fields
            if field.op is not None:  # carried as a scalar; else rebuilt by from_op
                assert f"{field.op} {field.name}" in fwd and f"{field.op} {field.name}" in bwd
            else:
                assert feature.from_op is not None, feature.name
        for t in feature.tensors:
            assert t.name in input_fields
            assert f"Tensor? {t.name}" in fwd and f"Tensor? {t.name}" in bwd
        for flag in feature.flags:
            assert getattr(caps, flag.name) == flag.default
        for column, _ in feature.columns:
            assert column in caps.summary()
    # One more output of varlen_bwd per differentiable tensor (dsinks).
    assert bwd.endswith("-> (Tensor, Tensor, Tensor, Tensor)")


def test_capabilities_keep_keyword_construction():
    caps = attnhub.Capabilities(frozenset({torch.float16}), head_dims=(32, 256), softcap=False,
                                page_size_multiple=None, custom_mask=True)
    assert caps.dtypes == frozenset({torch.float16}) and not caps.softcap
    assert caps.custom_mask and not caps.sinks and caps.sinks_backward
    assert dataclasses.replace(caps, sinks=True).sinks
    with pytest.raises(TypeError):
        attnhub.Capabilities(dtypes=frozenset({torch.float16}), no_such_flag=True)


def test_an_unknown_feature_argument_is_a_type_error():
    q = torch.randn(4, 2, 8)
    with pytest.raises(TypeError, match="sink_logits"):
        attnhub.normalize(q, q, q, [0, 4], [0, 4], sink_logits=torch.zeros(2))


def test_the_op_round_trips_every_feature():
    """pack -> the op's unpacking gives the problem back (lengths aside)."""
    q = torch.randn(9, 4, 8)
    k = torch.randn(5, 4, 2, 8)
    table = torch.tensor([[3, 0], [1, 2]], dtype=torch.int32)
    problem, inputs = attnhub.normalize(
        q, k, k, [0, 4, 9], [0, 7, 8], block_table=table, causal=True, window_size=(3, 0),
        softcap=2.0, alibi_slopes=torch.rand(2, 4), mask_alignment="top_left",
        deterministic=True, return_attn_probs=True, sinks=torch.zeros(4),
        custom_mask=torch.ones(4 * 7 + 5 * 1, dtype=torch.bool))
    args = ops.pack(problem, inputs, "reference")
    tensors = args[7:7 + len(features.TENSORS)]
    core = args[ops._FWD_CORE - 7:ops._FWD_CORE]  # max_q max_k scale requires_grad backend ...
    rebuilt, named, backend = ops._unpack(q, k, inputs.cu_seqlens_q, tensors,
                                          (*core[:3], *core[4:]), args[ops._FWD_CORE:],
                                          problem.requires_grad)
    assert backend == "reference" and named["sinks"] is inputs.sinks
    assert rebuilt == problem
