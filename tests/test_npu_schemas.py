"""Every call the npu adapter makes matches torch_npu 2.14.0's operator schemas.

The schema lines are kept verbatim in tests/data (facts about Ascend's API, from the wheel's
npu_native_functions_by_codegen.yaml). The adapter runs every path it has (v1, v2 with ALiBi
shifts, v3 with device lengths, several calls for more than 1024 sequences, sinks on v1, v2
and v3, paged prefill and decode) against the simulator, which records each call; each call
must bind to its schema: positional arguments only where the schema has them, every keyword a
parameter of that name, every value of the parameter's type, every required parameter given.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import torch
from npu_calls import OPERATORS, recorded_calls

import attnhub
from attnhub import host_copies
from attnhub.backends.npu import simulator

SCHEMAS = Path(__file__).parent / "data" / "torch_npu_2.14.0_attention_schemas.txt"


def parse_schemas(path: Path = SCHEMAS) -> dict[str, list[dict]]:
    """name -> parameters [{name, type, has_default, keyword_only}] of each schema line."""
    out = {}
    for line in path.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\w+)\((.*)\) -> .*", line.strip())
        assert m, line
        params, keyword_only = [], False
        for item in _split_top_level(m.group(2)):
            if item == "*":
                keyword_only = True
                continue
            decl, _, default = item.partition("=")
            typ, name = decl.rsplit(" ", 1)
            params.append({"name": name, "type": typ, "has_default": bool(default),
                           "keyword_only": keyword_only})
        out[m.group(1)] = params
    return out


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    return parts


def value_matches(typ: str, value: object) -> bool:
    """Whether a Python value is what torch's schema type ``typ`` takes."""
    if typ.endswith("?"):
        return value is None or value_matches(typ[:-1], value)
    if typ in ("int[]", "SymInt[]"):
        return isinstance(value, (list, tuple)) and all(
            isinstance(x, int) and not isinstance(x, bool) for x in value)
    if typ == "Tensor":
        return isinstance(value, torch.Tensor)
    if typ in ("int", "SymInt"):
        return isinstance(value, int) and not isinstance(value, bool)
    if typ == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ == "bool":
        return isinstance(value, bool)
    if typ == "str":
        return isinstance(value, str)
    raise AssertionError(f"schema type {typ!r} not handled")


def schema_violations(schema: list[dict], args: tuple, kwargs: dict) -> list[str]:
    """Plain sentences for every way one call departs from its schema (empty: it binds)."""
    out = []
    positional = [p for p in schema if not p["keyword_only"]]
    if len(args) > len(positional):
        out.append(f"{len(args)} positional arguments, the schema takes {len(positional)}")
    given = {}
    for p, value in zip(positional, args, strict=False):
        given[p["name"]] = value
    by_name = {p["name"]: p for p in schema}
    for name, value in kwargs.items():
        if name not in by_name:
            out.append(f"keyword {name!r} is not in the schema")
        elif name in given:
            out.append(f"{name!r} given twice")
        else:
            given[name] = value
    for name, value in given.items():
        if name in by_name and not value_matches(by_name[name]["type"], value):
            out.append(f"{name}={value!r:.60} is not of type {by_name[name]['type']}")
    out.extend(f"required {p['name']!r} missing" for p in schema
               if not p["has_default"] and p["name"] not in given)
    return out


def _qkv(lq, lk, n=4, nk=2, d=16, grad=True, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(sum(lq), n, d, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(sum(lk), nk, d, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(sum(lk), nk, d, generator=g).to(dtype).requires_grad_(grad)
    return q, k, v


def _cu(lengths):
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _fwd_bwd(lq, lk, **kw):
    q, k, v = _qkv(lq, lk)
    out = attnhub.attention_forward_varlen(q, k, v, _cu(lq), _cu(lk), backend="npu", **kw)
    out.sum().backward()


def _paged(lq, lk, page, **kw):
    q = torch.randn(sum(lq), 4, 16, dtype=torch.float16)
    pages = [-(-n // page) for n in lk]
    pool_k = torch.randn(sum(pages) + 1, page, 2, 16, dtype=torch.float16)
    pool_v = torch.randn_like(pool_k)
    table = torch.zeros(len(lk), max(pages), dtype=torch.int32)
    first = 0
    for b, n in enumerate(pages):
        table[b, :n] = torch.arange(first, first + n, dtype=torch.int32)
        first += n
    return attnhub.attention_forward_varlen(q, pool_k, pool_v, _cu(lq), _cu(lk),
                                            block_table=table, backend="npu", **kw)


def exercise_every_path(monkeypatch) -> None:
    """One attnhub call down each path of the adapter."""
    _fwd_bwd((3, 0, 5), (4, 2, 6))  # v1, no mask, an empty sequence gathered out
    _fwd_bwd((5, 3), (3, 4), causal=True, dropout_p=0.2)  # v1, rows without keys dropped
    _fwd_bwd((6, 2), (2, 5), window_size=(2, 1), softmax_scale=0.3)  # v1, band
    _fwd_bwd((3, 5, 4), (6, 5, 2), alibi_slopes=torch.rand(3, 4), causal=True)  # v2 shifts
    _fwd_bwd((1,) * 1030, (1,) * 1030, causal=True)  # two calls (at most 1024 sequences)
    sinks = torch.rand(4, requires_grad=True)
    _fwd_bwd((5, 3), (3, 4), causal=True, sinks=sinks)  # v1 with sink, rows dropped
    _fwd_bwd((3, 5, 4), (6, 5, 2), alibi_slopes=torch.rand(4), sinks=sinks)  # v2 with sink
    with monkeypatch.context() as m:  # lengths only on the device: v3
        m.setattr(host_copies, "can_read_back", lambda: False)
        q, k, v = _qkv((3, 0, 5), (3, 0, 5))
        cu = torch.tensor(_cu((3, 0, 5)), dtype=torch.int32)
        out = attnhub.attention_forward_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_k=5,
                                               causal=True, dropout_p=0.1, backend="npu")
        out.sum().backward()
        out = attnhub.attention_forward_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_k=5,
                                               causal=True, sinks=sinks, backend="npu")
        out.sum().backward()
    _paged((20, 9), (40, 30), 128, causal=True)  # paged prefill
    _paged((20, 9), (40, 30), 128, window_size=(5, 0))
    _paged((1, 1, 1), (40, 0, 17), 16, causal=True)  # paged decode
    _paged((1, 1), (40, 17), 16, window_size=(8, 0))  # paged decode, (B, KV_S) mask


@pytest.fixture(scope="module")
def schemas():
    return parse_schemas()


def test_the_fixture_holds_every_operator_the_adapter_calls(schemas):
    assert set(OPERATORS) <= set(schemas)


def test_every_adapter_call_binds_to_the_2_14_0_schema(schemas, monkeypatch):
    with recorded_calls() as calls:
        exercise_every_path(monkeypatch)
    assert {name for name, _, _ in calls} == set(OPERATORS)  # every path was taken
    with_sink = {name for name, _, kwargs in calls if "sink" in kwargs}
    assert with_sink == set(OPERATORS) - {"npu_fused_infer_attention_score"}
    for name, args, kwargs in calls:
        problems = schema_violations(schemas[name], args, kwargs)
        assert not problems, f"{name}: {problems}"


def test_the_checker_catches_departures(schemas):
    schema = schemas["npu_fusion_attention"]
    q = torch.zeros(2, 1, 4)
    good = {"head_num": 1, "input_layout": "TND", "actual_seq_qlen": [2]}
    assert not schema_violations(schema, (q, q, q), good)
    assert schema_violations(schema, (q, q, q), {**good, "pre_tokens": 1})  # v2's spelling
    assert schema_violations(schema, (q, q, q), {**good, "actual_seq_qlen": torch.tensor([2])})
    assert schema_violations(schema, (q, q, q), {**good, "keep_prob": "1"})
    assert schema_violations(schema, (q, q), good)  # value missing
    v3 = schemas["npu_fusion_attention_v3"]
    assert schema_violations(v3, (q, q, q), good)  # v3 takes the lengths as tensors


@pytest.mark.parametrize("name", OPERATORS)
def test_the_simulator_takes_exactly_the_schema_parameters(schemas, name):
    params = list(inspect.signature(getattr(simulator, name)).parameters.values())
    assert [p.name for p in params] == [p["name"] for p in schemas[name]]
    keyword_only = [p.kind is inspect.Parameter.KEYWORD_ONLY for p in params]
    assert keyword_only == [p["keyword_only"] for p in schemas[name]]
