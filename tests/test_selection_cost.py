"""Selection by measured cost: problem classes, cost tables (load, merge, precedence),
ranking (ties, unmeasured backends and classes), dispatch and torch.compile with a table."""

from __future__ import annotations

import contextlib
import json
import warnings

import pytest
import torch
from conftest import make_backend
from torch._dynamo.testing import CompileCounter

import attnhub
from attnhub import cost_tables, dispatch
from attnhub.errors import InvalidEnvironmentError
from attnhub.normalize import normalize
from attnhub.problem import VarlenProblem
from attnhub.problem_class import ProblemClass, classify, size_bucket


def _problem(lengths=(3, 5), nheads=4, nheads_k=2, head_dim=16, dtype=torch.float32,
             grad=False, **kw):
    total = sum(lengths)
    q = torch.randn(total, nheads, head_dim, dtype=dtype, requires_grad=grad)
    k = torch.randn(total, nheads_k, head_dim, dtype=dtype)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return normalize(q, k, k, cu, cu, **kw)[0]


def _class(**kw) -> ProblemClass:
    p = _problem(**kw)
    return classify(p, size_bucket(p))


# -- classes --------------------------------------------------------------------------------------

def test_class_fields_from_a_call():
    c = _class(head_dim=80, nheads=8, nheads_k=2, causal=True, grad=True)
    assert c == ProblemClass("float32", 96, "2-8", "causal", "tiny", True)
    assert c.key() == "float32/d96/g2-8/causal/tiny/fwd+bwd"
    assert ProblemClass.parse(c.key()) == c


@pytest.mark.parametrize("kw, field, value", [
    ({"nheads": 4, "nheads_k": 4}, "group", "1"),
    ({"nheads": 16, "nheads_k": 2}, "group", "2-8"),
    ({"nheads": 16, "nheads_k": 1}, "group", "9+"),
    ({"head_dim": 64}, "head_dim", 64),
    ({"head_dim": 65}, "head_dim", 96),
    ({"head_dim": 200}, "head_dim", 256),
    ({"head_dim": 300}, "head_dim", 512),
    ({}, "mask", "none"),
    ({"causal": True}, "mask", "causal"),
    ({"causal": True, "window_size": (2, 0)}, "mask", "window"),
    ({"causal": True, "window_size": (2, 0), "softcap": 5.0}, "mask", "softcap"),
    ({"softcap": 5.0, "alibi_slopes": torch.ones(4)}, "mask", "alibi"),
    ({"dtype": torch.bfloat16}, "dtype", "bfloat16"),
])
def test_class_buckets(kw, field, value):
    assert getattr(_class(**kw), field) == value


@pytest.mark.parametrize("lengths, nheads, head_dim, length", [
    ((3, 5), 4, 16, "tiny"),
    ((1, 1, 1), 4, 16, "decode"),
    ((256,) * 64, 32, 128, "short"),
    ((257,) * 2 + (1,) * 40000, 32, 128, "medium"),
    ((4097,) + (1,) * 3000, 32, 128, "long"),
])
def test_length_buckets(lengths, nheads, head_dim, length):
    p = VarlenProblem("cpu", torch.float32, len(lengths), sum(lengths), sum(lengths), nheads,
                      nheads, head_dim, max(lengths), max(lengths), 1.0)
    assert size_bucket(p) == length


def test_class_of_a_signature_is_the_class_of_the_call():
    """Selection classifies the problem rebuilt from the signature: same class."""
    for kw in ({"causal": True}, {"lengths": (1, 1)}, {"softcap": 2.0, "grad": True}):
        p = _problem(**kw)
        rebuilt = VarlenProblem.from_signature(p.signature())
        assert classify(rebuilt, size_bucket(p)) == classify(p, size_bucket(p))


@pytest.mark.parametrize("key, message", [
    ("float32/d64/g1/causal/tiny", "6 fields"),
    ("float99/d64/g1/causal/tiny/fwd", "unknown dtype"),
    ("float32/64/g1/causal/tiny/fwd", "is not dN"),
    ("float32/d64/g3/causal/tiny/fwd", "group '3'"),
    ("float32/d64/g1/sparse/tiny/fwd", "mask 'sparse'"),
    ("float32/d64/g1/causal/tiny/bwd", "pass 'bwd'"),
])
def test_bad_class_keys_are_named(key, message):
    with pytest.raises(ValueError, match=message):
        ProblemClass.parse(key)


# -- ranking --------------------------------------------------------------------------------------

CONTENDERS = [("a", 30), ("b", 20), ("c", 10)]


@pytest.mark.parametrize("costs, chosen", [
    ({"a": 2.0, "b": 1.0, "c": 3.0}, "b"),  # fastest
    ({"a": 1.02, "b": 1.0, "c": 3.0}, "a"),  # within 3%: priority
    ({"a": 1.04, "b": 1.0, "c": 1.01}, "b"),  # a outside 3%; b above c
    ({"b": 2.0, "c": 1.0}, "a"),  # unmeasured a ranks above the measured choice c
    ({"a": 2.0, "b": 1.0}, "b"),  # unmeasured c ranks below b: not chosen
    ({"x": 1.0}, None),  # no contender measured
    ({}, None),
])
def test_choose(costs, chosen):
    assert cost_tables.choose(CONTENDERS, costs) == chosen


# -- tables ---------------------------------------------------------------------------------------

def _table(classes, name=None, match=None) -> dict:
    name = name or cost_tables.device_identity("cpu").name
    data = {"format": cost_tables.FORMAT, "device": {"type": "cpu", "name": name},
            "classes": classes}
    if match is not None:
        data["match"] = match
    return data


def _write_user(tmp_path, monkeypatch, classes, **kw):
    monkeypatch.setenv("ATTNHUB_CACHE_DIR", str(tmp_path))
    path = cost_tables.user_table_path(cost_tables.device_identity("cpu"))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_table(classes, **kw)))
    dispatch.clear_cache()
    return path


KEY = "float32/d64/g2-8/none/tiny/fwd"


def test_user_table_is_found_in_the_cache_dir(tmp_path, monkeypatch):
    path = _write_user(tmp_path, monkeypatch, {KEY: {"x": 1.0}})
    assert path.parent == tmp_path and path.name.startswith("selection-cpu-")
    table = cost_tables.active("cpu")
    assert table is not None and [t.source for t in table.tables] == ["user-tuned"]
    assert table.costs(ProblemClass.parse(KEY)) == {"x": 1.0}


def test_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("ATTNHUB_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cost_tables.cache_dir() == tmp_path / "attnhub"


def test_user_table_of_another_device_is_ignored(tmp_path, monkeypatch):
    _write_user(tmp_path, monkeypatch, {KEY: {"x": 1.0}}, name="some other cpu")
    assert cost_tables.active("cpu") is None


def test_broken_user_table_warns_once_and_is_ignored(tmp_path, monkeypatch):
    path = _write_user(tmp_path, monkeypatch, {KEY: {"x": -1.0}})
    with pytest.warns(RuntimeWarning, match="expected {backend name: milliseconds > 0}"):
        assert cost_tables.active("cpu") is None
    path.write_text("{not json")
    dispatch.clear_cache()
    with pytest.warns(RuntimeWarning, match="not JSON|ignoring user-tuned cost table"):
        assert cost_tables.active("cpu") is None


def test_user_classes_replace_shipped_ones(tmp_path, monkeypatch):
    other = "float32/d64/g2-8/causal/tiny/fwd"
    shipped = cost_tables.CostTable.from_json(
        _table({KEY: {"x": 1.0}, other: {"x": 5.0}}, name="family",
               match={"type": "cpu", "name_pattern": "."}), "shipped", "pkg/cpu.json")
    monkeypatch.setattr(cost_tables, "shipped_tables", lambda: [shipped])
    _write_user(tmp_path, monkeypatch, {KEY: {"x": 2.0, "y": 1.0}})
    table = cost_tables.active("cpu")
    assert [t.source for t in table.tables] == ["shipped", "user-tuned"]
    assert table.costs(ProblemClass.parse(KEY)) == {"x": 2.0, "y": 1.0}
    assert table.costs(ProblemClass.parse(other)) == {"x": 5.0}


def test_shipped_table_matches_by_type_capability_and_name():
    table = cost_tables.CostTable.from_json(
        _table({}, name="NVIDIA H200", match={"type": "cuda", "capability": "9.0",
                                             "name_pattern": "H100|H200"}), "shipped", "t")
    assert table.matches(cost_tables.DeviceIdentity("cuda", "NVIDIA H100 80GB HBM3", "9.0"))
    assert not table.matches(cost_tables.DeviceIdentity("cuda", "NVIDIA H100", "8.0"))
    assert not table.matches(cost_tables.DeviceIdentity("cuda", "NVIDIA A100", "9.0"))
    assert not table.matches(cost_tables.DeviceIdentity("cpu", "H100", None))


def test_twin_dtype_lookup():
    table = cost_tables.ActiveTable(cost_tables.DeviceIdentity("cpu", "c"), {
        "bfloat16/d128/g2-8/causal/short/fwd": {"a": 1.0, "b": 4.0}}, [])
    half = ProblemClass("float16", 128, "2-8", "causal", "short", False)
    assert table.costs(half) == {"a": 1.0, "b": 4.0}
    assert table.costs(half._replace(dtype="float32")) is None


def test_shipped_tables_in_the_package_are_valid():
    for table in cost_tables.shipped_tables():
        assert table.match is not None, f"{table.path}: a shipped table needs a match block"


# -- dispatch with a table ------------------------------------------------------------------------

def _inputs(grad=False):
    torch.manual_seed(0)
    q = torch.randn(8, 4, 16, requires_grad=grad)
    k, v = torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    return q, k, v, [0, 3, 8], [0, 3, 8]


def test_fastest_measured_backend_runs(install, tmp_path, monkeypatch):
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY: {"high": 2.0, "low": 1.0}})
    attnhub.attention_forward_varlen(*_inputs())
    assert low.calls == ["forward"] and high.calls == []
    expl = attnhub.explain(*_inputs())
    assert expl.selected == "low"
    assert f"measured cost of class {KEY}" in expl.basis and "user-tuned" in expl.basis
    assert "-> low (priority 10, measured 1 ms)" in str(expl)
    assert "ok high (priority 20, measured 2 ms)" in str(expl)


def test_priority_decides_within_three_percent(install, tmp_path, monkeypatch):
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY: {"high": 1.02, "low": 1.0}})
    assert attnhub.explain(*_inputs()).selected == "high"


def test_unmeasured_class_and_priority_mode_use_priority(install, tmp_path, monkeypatch):
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY: {"high": 2.0, "low": 1.0}})
    expl = attnhub.explain(*_inputs(), causal=True)  # another class
    assert expl.selected == "high" and "never measured" in expl.basis
    monkeypatch.setenv("ATTNHUB_SELECTION", "priority")
    attnhub.attention_forward_varlen(*_inputs())
    assert high.calls == ["forward"] and low.calls == []
    assert attnhub.explain(*_inputs()).basis == "priority (ATTNHUB_SELECTION=priority)"
    monkeypatch.setenv("ATTNHUB_SELECTION", "fastest")
    with pytest.raises(InvalidEnvironmentError, match="ATTNHUB_SELECTION"):
        attnhub.attention_forward_varlen(*_inputs())


def test_plan_fast_path_follows_the_selection_mode(install, tmp_path, monkeypatch):
    """Device offsets with max_seqlen given take the plan fast path: its key holds
    ATTNHUB_SELECTION, so switching the mode re-selects."""
    high, low = make_backend("high", 20, device_types=("meta",)), \
        make_backend("low", 10, device_types=("meta",))
    install(high, low)
    q = torch.empty(8, 4, 16, device="meta")
    k = torch.empty(8, 2, 16, device="meta")
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device="meta")
    monkeypatch.setattr(cost_tables, "active", lambda device_type: cost_tables.ActiveTable(
        cost_tables.DeviceIdentity("meta", "m"), {KEY: {"high": 2.0, "low": 1.0}}, []))
    for mode, backend in ((None, low), ("priority", high), (None, low)):
        if mode is None:
            monkeypatch.delenv("ATTNHUB_SELECTION", raising=False)
        else:
            monkeypatch.setenv("ATTNHUB_SELECTION", mode)
        backend.calls.clear()
        for _ in range(2):
            # The fake kernel cannot compute on meta tensors: dispatch has happened by then.
            with contextlib.suppress(Exception):
                attnhub.attention_forward_varlen(q, k, k, cu, cu, 5, 5)
        assert backend.calls == ["forward", "forward"], mode


def test_backend_with_reasons_is_never_chosen_for_speed(install, tmp_path, monkeypatch):
    picky = make_backend("picky", 20, reasons=["nope"])
    ok = make_backend("ok", 10)
    install(picky, ok)
    _write_user(tmp_path, monkeypatch, {KEY: {"picky": 0.1, "ok": 1.0}})
    assert attnhub.explain(*_inputs()).selected == "ok"


def test_forced_backend_ignores_the_table(install, tmp_path, monkeypatch):
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY: {"high": 2.0, "low": 1.0}})
    attnhub.attention_forward_varlen(*_inputs(), backend="high")
    assert high.calls == ["forward"] and low.calls == []


def test_reference_measured_fastest_runs_without_a_fallback_warning(install, tmp_path,
                                                                  monkeypatch):
    accel = make_backend("accel", 10)
    install(accel)
    _write_user(tmp_path, monkeypatch, {KEY: {"accel": 3.0, "reference": 1.0}})
    monkeypatch.setenv("ATTNHUB_FALLBACK", "error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        attnhub.attention_forward_varlen(*_inputs())
    assert accel.calls == []
    assert attnhub.explain(*_inputs()).selected == "reference"


def test_below_a_fallback_only_forced(install, tmp_path, monkeypatch):
    """A backend ranked below the reference (interpreted Triton, the NPU simulator) is no
    contender even when a table says it is fast."""
    accel, sim = make_backend("accel", 10), make_backend("sim", -2000)
    install(accel, sim)
    _write_user(tmp_path, monkeypatch, {KEY: {"accel": 3.0, "reference": 2.0, "sim": 0.1}})
    assert attnhub.explain(*_inputs()).selected == "reference"


def test_fallback_policy_unchanged_when_only_the_reference_can_run(install, tmp_path,
                                                                   monkeypatch):
    half = make_backend("half", 10, dtypes=(torch.float16,))
    install(half)
    _write_user(tmp_path, monkeypatch, {KEY: {"half": 0.1, "reference": 1.0}})
    monkeypatch.setenv("ATTNHUB_FALLBACK", "error")
    with pytest.raises(attnhub.BackendUnavailableError, match="ATTNHUB_FALLBACK=error"):
        attnhub.attention_forward_varlen(*_inputs())


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_folds_the_measured_choice(install, tmp_path, monkeypatch):
    """The table is read while tracing and the choice is a constant of the graph: no graph
    break, one compilation."""
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY.replace("tiny", "short"): {"high": 2.0, "low": 1.0}})
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v, cu: attnhub.attention_forward_varlen(
        q, k, v, cu, cu, 5, 5), backend=counter, fullgraph=True)
    q, k, v, cu, _ = _inputs()
    cu = torch.tensor(cu, dtype=torch.int32)
    compiled(q, k, v, cu)
    compiled(q, k, v, cu)
    assert counter.frame_count == 1
    assert low.calls == ["forward"] * 2 and not high.calls


@pytest.mark.usefixtures("fresh_dynamo")
def test_compile_ranks_without_the_tiny_bucket(install, tmp_path, monkeypatch):
    """Traced, total_q is not read (no guard on the token count): the call's length bucket
    comes from max_seqlen_k alone, here "short". Eager, the same call is "tiny", a class this
    table never measured (priority)."""
    high, low = make_backend("high", 20), make_backend("low", 10)
    install(high, low)
    _write_user(tmp_path, monkeypatch, {KEY.replace("tiny", "short"): {"high": 2.0, "low": 1.0}})
    counter = CompileCounter()
    compiled = torch.compile(lambda q, k, v, cu, m: attnhub.attention_forward_varlen(
        q, k, v, cu, cu, m, m), backend=counter, fullgraph=True, dynamic=True)
    q, k, v, cu, _ = _inputs()
    cu = torch.tensor(cu, dtype=torch.int32)
    compiled(q, k, v, cu, 5)
    compiled(q, k, v, cu, 5)
    assert low.calls == ["forward"] * 2 and not high.calls
    assert counter.frame_count == 1
    attnhub.attention_forward_varlen(q, k, v, cu, cu, 5, 5)
    assert high.calls == ["forward"]


def test_explain_basis_for_forced_and_impossible_calls(install):
    half = make_backend("half", 10, dtypes=(torch.float16,))
    install(half, reference=False)
    assert attnhub.explain(*_inputs()).basis.startswith(
        "none: no registered backend can run this call")
    assert attnhub.explain(*_inputs(), backend="half").basis.startswith(
        "none: backend 'half' (forced by the backend= argument) cannot run this call")
    install(half)
    assert attnhub.explain(*_inputs(), backend="reference").basis == \
        "forced by the backend= argument"


@pytest.mark.parametrize("device_type, host_lengths, length", [
    ("cuda", True, "tiny-host"),
    ("cuda", False, "tiny"),
    ("cpu", True, "tiny"),  # offsets of a CPU call are host data: one bucket
])
def test_tiny_calls_with_host_lengths_have_their_own_bucket(device_type, host_lengths, length):
    """On an accelerator a tiny call whose lengths the host knows (a VarlenInfo) and one with
    device offsets only take different host paths through some backends, so they are
    classes of their own; on the CPU they are one."""
    lengths = (64,) * 8
    known = lengths if host_lengths else None
    p = VarlenProblem(device_type, torch.bfloat16, 8, 512, 512, 32, 8, 128, 64, 64, 1.0,
                      seqlens_q=known, seqlens_k=known)
    assert p.lengths_known == host_lengths
    assert size_bucket(p) == length


def test_tiny_host_class_uses_the_tiny_entry_until_measured():
    host = ProblemClass("bfloat16", 128, "2-8", "causal", "tiny-host", False)
    device = host._replace(length="tiny")
    table = cost_tables.ActiveTable(cost_tables.device_identity("cpu"),
                                    {device.key(): {"a": 1.0, "b": 2.0}}, [])
    assert table.costs(host) == {"a": 1.0, "b": 2.0}
    table.classes[host._replace(dtype="float16").key()] = {"a": 3.0, "b": 1.0}
    assert table.costs(host) == {"a": 3.0, "b": 1.0}  # its own class (the dtype twin's)
    table.classes[host.key()] = {"a": 5.0, "b": 4.0}
    assert table.costs(host) == {"a": 5.0, "b": 4.0}
    assert ProblemClass.parse(host.key()) == host
