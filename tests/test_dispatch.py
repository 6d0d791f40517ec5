"""Registry (pluggy plugins, entry points, failures) and dispatch (priorities, reasons, overrides,
fallback policy, caching), with fake backends that compute through the reference kernel."""

from __future__ import annotations

import importlib.metadata
import types
import warnings

import pytest
import torch
from conftest import make_backend, plugin_of

import attnhub
from attnhub import (
    BackendUnavailableError,
    InvalidArgumentError,
    UnknownBackendError,
    use_backend,
)
from attnhub.backends.reference import plugin as reference_plugin
from attnhub.dispatch import clear_cache
from attnhub.registry import BUILTIN_PLUGINS, Registry, get_registry, reset_registry

REFERENCE_PLUGIN = "attnhub.backends.reference.plugin"


def _inputs(lengths=(3, 5), dtype=torch.float32, requires_grad=False, nheads=4, nheads_k=2,
            head_dim=16):
    torch.manual_seed(0)
    total = sum(lengths)
    q = torch.randn(total, nheads, head_dim, dtype=dtype, requires_grad=requires_grad)
    k = torch.randn(total, nheads_k, head_dim, dtype=dtype, requires_grad=requires_grad)
    v = torch.randn(total, nheads_k, head_dim, dtype=dtype, requires_grad=requires_grad)
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return q, k, v, cu, cu


def _call(*args, **kwargs):
    return attnhub.attention_forward_varlen(*_inputs(**kwargs.pop("shape", {})), *args, **kwargs)


def _expected(**shape):
    return attnhub.attention_forward_varlen(*_inputs(**shape), backend="reference")


def _explain(**kwargs):
    return attnhub.explain(*_inputs(**kwargs.pop("shape", {})), **kwargs)


# -- priorities and reasons ----------------------------------------------------------------------

def test_highest_priority_backend_without_reasons_runs(install):
    low, mid, high = make_backend("low", 1), make_backend("mid", 5), make_backend("high", 9)
    install(low, high, mid)
    out = _call()
    assert high.calls == ["forward"] and mid.calls == [] and low.calls == []
    torch.testing.assert_close(out, _expected())
    assert attnhub.select(attnhub.normalize(*_inputs())[0]) is high


def test_backend_with_reasons_is_skipped(install):
    high = make_backend("high", 9, reasons=["my kernel is busy"])
    mid = make_backend("mid", 5)
    install(high, mid)
    _call()
    assert high.calls == [] and mid.calls == ["forward"]
    expl = _explain()
    assert isinstance(expl, attnhub.Explanation) and isinstance(expl, tuple)
    assert [v.backend for v in expl] == ["high", "mid", "reference"]  # the order they are tried
    by_name = {v.backend: v for v in expl}
    assert isinstance(by_name["high"], attnhub.Verdict)
    assert by_name["high"].reasons == ("my kernel is busy",) and not by_name["high"].ok
    assert by_name["mid"].selected and by_name["mid"].ok and by_name["mid"].reasons == ()
    assert not by_name["high"].selected and not by_name["reference"].selected
    assert by_name["high"].priority == 9
    assert expl.selected == "mid"


def test_capability_reasons_in_explain(install):
    picky = make_backend("picky", 9, dtypes=(torch.bfloat16,), head_dims=(64, 256),
                         head_dim_multiple=8, softcap=False, gqa=False, window=False,
                         alibi=frozenset(), dropout=False, page_size_multiple=None,
                         top_left=False, return_probs=False)
    install(picky)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the fallback warning: tested below
        expl = _explain(softcap=5.0, window_size=(2, 2), alibi_slopes=torch.rand(4),
                        mask_alignment="top_left", return_attn_probs=True)
    reasons = next(v for v in expl if v.backend == "picky").reasons
    text = "\n".join(reasons)
    for expected in ("dtype float32 is not supported (supported: bfloat16)",
                     "head_dim 16 is not supported (needs 64..256 and a multiple of 8)",
                     "softcap (5.0) is not supported",
                     "grouped-query attention (nheads 4 != nheads_k 2) is not supported",
                     "sliding window (2, 2) is not supported",
                     "ALiBi slopes of shape (nheads,) are not supported",
                     "top-left mask alignment", "return_attn_probs is not supported"):
        assert expected in text, text
    assert expl.selected == "reference"
    rendered = str(expl)
    assert "-> reference (priority -1000)" in rendered
    assert "-- picky (priority 9)" in rendered
    assert "     softcap (5.0) is not supported" in rendered


def test_backend_of_other_device_is_shown_with_its_reason(install):
    gpu = make_backend("gpu-only", 50, device_types=("cuda",))
    install(gpu)
    expl = _explain()
    verdict = next(v for v in expl if v.backend == "gpu-only")
    assert verdict.reasons == ("runs on cuda tensors, not cpu",)
    assert expl.selected == "reference"


def test_why_not_raising_is_a_reason_not_a_crash(install):
    broken = make_backend("broken", 9, raises=ValueError("boom"))
    ok = make_backend("ok", 5)
    install(broken, ok)
    out = _call()
    assert ok.calls == ["forward"]
    torch.testing.assert_close(out, _expected())
    verdict = next(v for v in _explain() if v.backend == "broken")
    assert verdict.reasons == ("why_not raised ValueError: boom",)


def test_unavailable_backend_is_skipped_and_explained(install):
    missing = make_backend("missing", 9, unavailable=["package x not installed"])
    ok = make_backend("ok", 5)
    install(missing, ok)
    _call()
    assert missing.calls == [] and missing.why_not_calls == 0 and ok.calls == ["forward"]
    verdict = next(v for v in _explain() if v.backend == "missing")
    assert verdict.reasons == ("package x not installed",)
    assert "package x not installed" in str(_explain())


def test_unavailable_reasons_raising_is_a_reason(install):
    class Crashy(type(make_backend("tmp"))):
        name = "crashy"
        priority = 9

        def unavailable_reasons(self):
            raise OSError("driver missing")

    install(Crashy())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explain() decides like a call but never warns
        expl = _explain()
    verdict = next(v for v in expl if v.backend == "crashy")
    assert verdict.reasons == ("availability check raised OSError: driver missing",)
    assert expl.selected == "reference"
    # explain() did not spend the one-time fallback warning: the first real call gets it.
    with pytest.warns(RuntimeWarning, match="crashy: availability check raised OSError"):
        out = _call()
    assert out.shape == (8, 4, 16)


def test_no_backend_for_device_raises(install):
    install(reference=False)
    with pytest.raises(BackendUnavailableError, match="no backend is registered"):
        _call()


# -- overrides -----------------------------------------------------------------------------------

@pytest.fixture
def four(install):
    backends = {n: make_backend(n, p) for n, p in (("auto", 40), ("env", 30), ("ctx", 20),
                                                    ("arg", 10))}
    install(*backends.values())
    return backends


def _ran(backends):
    ran = [n for n, b in backends.items() if b.calls]
    for b in backends.values():
        b.calls.clear()
    return ran


def test_override_strength(four, monkeypatch):
    _call()
    assert _ran(four) == ["auto"]
    monkeypatch.setenv("ATTNHUB_BACKEND", "env")
    _call()
    assert _ran(four) == ["env"]
    with use_backend("ctx"):
        _call()
        assert _ran(four) == ["ctx"]
        _call(backend="arg")
        assert _ran(four) == ["arg"]
        assert _explain().selected == "ctx"
        assert _explain(backend="arg").selected == "arg"
    _call()
    assert _ran(four) == ["env"]
    monkeypatch.delenv("ATTNHUB_BACKEND")
    _call()
    assert _ran(four) == ["auto"]


def test_use_backend_none_lifts_outer_override(four):
    with use_backend("ctx"):
        with use_backend(None):
            _call()
            assert _ran(four) == ["auto"]
            with use_backend("arg"):
                _call()
                assert _ran(four) == ["arg"]
        _call()
        assert _ran(four) == ["ctx"]


def test_use_backend_is_restored_after_an_exception(four):
    with pytest.raises(KeyError), use_backend("ctx"):
        raise KeyError("x")
    _call()
    assert _ran(four) == ["auto"]


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_forced_backend_that_cannot_run_raises_and_never_falls_back(install, monkeypatch, how):
    fp16 = make_backend("fp16", 50, dtypes=(torch.float16,), reasons=["also: no weekends"])
    other = make_backend("other", 10)
    install(fp16, other)
    kwargs = {}
    if how == "argument":
        kwargs["backend"] = "fp16"
    elif how == "env":
        monkeypatch.setenv("ATTNHUB_BACKEND", "fp16")
    with use_backend("fp16" if how == "context" else None), \
            pytest.raises(BackendUnavailableError) as exc_info:
        _call(**kwargs)
    message = str(exc_info.value)
    assert "'fp16'" in message
    assert {"argument": "the backend= argument", "context": "attnhub.use_backend()",
            "env": "ATTNHUB_BACKEND"}[how] in message
    assert "dtype float32 is not supported (supported: float16)" in message
    assert "also: no weekends" in message
    assert fp16.calls == [] and other.calls == []


def test_forced_backend_of_other_device_raises(install):
    install(make_backend("gpu", 50, device_types=("cuda",)))
    with pytest.raises(BackendUnavailableError, match="runs on cuda tensors, not cpu"):
        _call(backend="gpu")


def test_forced_backend_with_reasons_explains_as_not_selected(install):
    install(make_backend("fp16", 50, dtypes=(torch.float16,)))
    expl = _explain(backend="fp16")
    assert expl.selected is None
    assert not any(v.selected for v in expl)


@pytest.mark.parametrize("how", ["argument", "context", "env"])
def test_unknown_backend_name(install, monkeypatch, how):
    install(make_backend("alpha", 5), make_backend("beta", 3))
    if how == "argument":
        with pytest.raises(UnknownBackendError) as exc_info:
            _call(backend="gamma")
        source = "the backend= argument"
    elif how == "context":
        with pytest.raises(UnknownBackendError) as exc_info, use_backend("gamma"):
            pass
        source = "attnhub.use_backend()"
    else:
        monkeypatch.setenv("ATTNHUB_BACKEND", "gamma")
        with pytest.raises(UnknownBackendError) as exc_info:
            _call()
        source = "ATTNHUB_BACKEND"
    exc = exc_info.value
    assert isinstance(exc, ValueError) and exc.name == "gamma"
    assert exc.valid == ["alpha", "beta", "reference"]
    assert "'gamma'" in str(exc) and source in str(exc)
    assert "registered backends: alpha, beta, reference" in str(exc)


def test_empty_env_backend_means_no_override(four, monkeypatch):
    monkeypatch.setenv("ATTNHUB_BACKEND", "")
    _call()
    assert _ran(four) == ["auto"]


# -- fallback policy -----------------------------------------------------------------------------

def _fallback_warnings(record):
    return [w for w in record if issubclass(w.category, RuntimeWarning)
            and "falling back" in str(w.message)]


@pytest.mark.parametrize("policy", [None, "warn"])
def test_fallback_warns_once(install, monkeypatch, policy):
    install(make_backend("fast", 10, dtypes=(torch.float16,)))
    if policy:
        monkeypatch.setenv("ATTNHUB_FALLBACK", policy)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for lengths in ((3, 5), (4, 4), (1, 7)):
            out = _call(shape={"lengths": lengths})
            assert torch.isfinite(out).all()
    found = _fallback_warnings(record)
    assert len(found) == 1
    message = str(found[0].message)
    assert "'reference'" in message and "fast: dtype float32 is not supported" in message
    assert "ATTNHUB_FALLBACK" in message


def test_fallback_error_lists_every_accelerated_backend(install, monkeypatch):
    a = make_backend("accel-a", 10, dtypes=(torch.float16,))
    b = make_backend("accel-b", 20, reasons=["no GQA today"])
    install(a, b)
    monkeypatch.setenv("ATTNHUB_FALLBACK", "error")
    with pytest.raises(BackendUnavailableError) as exc_info:
        _call()
    message = str(exc_info.value)
    assert "ATTNHUB_FALLBACK=error" in message
    assert "accel-a: dtype float32 is not supported (supported: float16)" in message
    assert "accel-b: no GQA today" in message
    assert a.calls == [] and b.calls == []
    # A forced reference is not a fallback: the policy does not apply.
    torch.testing.assert_close(_call(backend="reference"), _expected())


def test_fallback_allow_is_silent(install, monkeypatch):
    install(make_backend("fast", 10, dtypes=(torch.float16,)))
    monkeypatch.setenv("ATTNHUB_FALLBACK", "allow")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = _call()
    torch.testing.assert_close(out, _expected())


def test_fallback_bad_policy(install, monkeypatch):
    install(make_backend("fast", 10, dtypes=(torch.float16,)))
    monkeypatch.setenv("ATTNHUB_FALLBACK", "loud")
    with pytest.raises(InvalidArgumentError) as exc_info:
        _call()
    assert exc_info.value.argument == "ATTNHUB_FALLBACK"
    assert "one of warn, error, allow" in str(exc_info.value)


@pytest.mark.parametrize("policy", ["warn", "error"])
def test_no_fallback_warning_without_a_declining_accelerated_backend(install, monkeypatch,
                                                                     policy):
    """The reference alone on CPU (or with accelerated backends of other devices only) is the
    plain choice, not a fallback: no warning, no error."""
    monkeypatch.setenv("ATTNHUB_FALLBACK", policy)
    for extra in ((), (make_backend("gpu", 10, device_types=("cuda",)),)):
        install(*extra)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            torch.testing.assert_close(_call(), _expected())


def test_no_fallback_warning_when_accelerated_backend_runs(install):
    fast = make_backend("fast", 10)
    install(fast)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _call()
    assert fast.calls == ["forward"]


def test_fallback_warning_again_for_a_new_signature(install):
    install(make_backend("fast", 10, dtypes=(torch.float16,)))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _call()
        _call(causal=True)
        _call()
    assert len(_fallback_warnings(record)) == 2


# -- selection cache -----------------------------------------------------------------------------

def test_selection_cached_per_static_signature(install):
    fast = make_backend("fast", 10)
    install(fast)
    _call(shape={"lengths": (3, 5)})
    assert fast.why_not_calls == 1
    _call(shape={"lengths": (6, 1, 1)})  # other lengths, batch and total: same signature
    _call(shape={"lengths": (2, 5)}, max_seqlen_q=64, max_seqlen_k=64)
    assert fast.why_not_calls == 1 and fast.calls == ["forward"] * 3
    _call(causal=True)  # a new signature
    assert fast.why_not_calls == 2
    _call(shape={"dtype": torch.float64})
    assert fast.why_not_calls == 3
    clear_cache()
    _call()
    assert fast.why_not_calls == 4


def test_why_not_sees_the_static_signature_only(install):
    seen = []

    class Spy(type(make_backend("tmp"))):
        name = "spy"
        priority = 10

        def why_not(self, problem):
            seen.append(problem)
            return []

    install(Spy())
    _call()
    (problem,) = seen
    assert problem.nheads == 4 and problem.nheads_k == 2 and problem.head_dim == 16
    assert problem.dtype == torch.float32 and problem.device_type == "cpu"
    assert problem.length_facts() == (True, True)  # sq <= sk and sq == sk, from the signature


def test_reset_registry_clears_selection_cache(install):
    first = make_backend("first", 10)
    install(first)
    _call()
    second = make_backend("second", 20)
    install(second)
    _call()
    assert second.calls == ["forward"] and first.calls == ["forward"]


def test_registry_does_not_import_dispatch():
    """One import direction: dispatch registers its cache clearing with the registry."""
    import ast
    import inspect

    from attnhub import registry

    tree = ast.parse(inspect.getsource(registry))
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                for alias in node.names} | {
        node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert "dispatch" not in imported and "attnhub.dispatch" not in imported


def test_reset_registry_calls_its_listeners():
    calls = []
    listener = lambda: calls.append(1)  # noqa: E731
    from attnhub import registry

    registry.on_reset(listener)
    registry.on_reset(listener)  # registered once
    try:
        reset_registry(get_registry())
    finally:
        registry._reset_listeners.remove(listener)
    assert calls == [1]


# -- backward ------------------------------------------------------------------------------------

def test_backward_runs_on_the_backend_that_ran_forward(install):
    fast, slow = make_backend("fast", 20), make_backend("slow", 10)
    install(fast, slow)
    q, k, v, cu_q, cu_k = _inputs(requires_grad=True, dtype=torch.float64)
    with use_backend("slow"):
        out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True)
    out.sum().backward()  # outside the override: auto-selection would now pick "fast"
    assert slow.calls == ["forward", "backward"] and fast.calls == []
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    ref = attnhub.attention_forward_varlen(q2, k2, v2, cu_q, cu_k, causal=True,
                                           backend="reference")
    ref.sum().backward()
    torch.testing.assert_close(out, ref)
    for got, want in ((q.grad, q2.grad), (k.grad, k2.grad), (v.grad, v2.grad)):
        torch.testing.assert_close(got, want)
    out2 = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k)
    out2.sum().backward()
    assert fast.calls == ["forward", "backward"]


def test_no_grad_path_calls_forward_only(install):
    fast = make_backend("fast", 20)
    install(fast)
    q, k, v, cu_q, cu_k = _inputs(requires_grad=True)
    with torch.no_grad():
        out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k)
    assert not out.requires_grad and fast.calls == ["forward"]


# -- registry ------------------------------------------------------------------------------------

def test_default_registry_has_reference_via_plugin_hook():
    registry = reset_registry()
    assert registry is get_registry()
    assert "reference" in registry.backends
    assert registry.origins["reference"] == REFERENCE_PLUGIN
    assert REFERENCE_PLUGIN in BUILTIN_PLUGINS
    assert registry.failures == []
    ref = registry.backends["reference"]
    assert isinstance(ref, attnhub.Backend) and ref.fallback
    assert registry.plugin_manager.has_plugin(REFERENCE_PLUGIN)
    assert registry.names() == sorted(registry.backends)


def test_add_plugin_registers_through_the_hook():
    registry = Registry()
    b = make_backend("mine", 3)
    registry.add_plugin(plugin_of(b, name="my_plugin"))
    assert registry.backends == {"mine": b}
    assert registry.origins == {"mine": "my_plugin"}
    assert registry.for_device("cpu") == [b]
    assert registry.for_device("cuda") == []


def test_for_device_orders_by_priority_then_name():
    registry = Registry()
    bs = [make_backend("b", 1), make_backend("a", 1), make_backend("z", 7),
          make_backend("any", -5, device_types=("*",))]
    registry.add_plugin(plugin_of(*bs))
    assert [b.name for b in registry.for_device("cpu")] == ["z", "a", "b", "any"]
    assert [b.name for b in registry.for_device("npu")] == ["any"]


def _assert_one_failure(registry, record, label, text):
    assert len(registry.failures) == 1
    failure = registry.failures[0]
    assert failure.plugin == label and text in failure.error, failure
    warned = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(warned) == 1 and label in str(warned[0].message) and text in str(warned[0].message)


def test_plugin_failing_to_import_is_reported_and_others_work(install):
    registry = install(make_backend("good", 5))

    def loader():
        raise ImportError("no module named kernels_x")

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry._add("broken_plugin", loader)
    _assert_one_failure(registry, record, "broken_plugin",
                        "failed to load: ImportError: no module named kernels_x")
    assert sorted(registry.backends) == ["good", "reference"]
    out = _call()
    assert registry.backends["good"].calls == ["forward"]
    torch.testing.assert_close(out, _expected())


def test_missing_builtin_module_is_reported_and_reference_still_works():
    registry = Registry()
    with pytest.warns(RuntimeWarning, match="nonexistent_mod") as record:
        registry.load(builtins=(REFERENCE_PLUGIN, "nonexistent_mod"), entry_points=False)
    assert len([w for w in record if "nonexistent_mod" in str(w.message)]) == 1
    assert [f.plugin for f in registry.failures] == ["nonexistent_mod"]
    assert "ModuleNotFoundError" in registry.failures[0].error
    assert list(registry.backends) == ["reference"]
    try:
        reset_registry(registry)
        assert _call().shape == (8, 4, 16)
    finally:
        reset_registry()


def test_plugin_whose_hook_raises_is_reported():
    registry = Registry()
    good = make_backend("good", 5)
    bad = types.ModuleType("bad_plugin")

    @attnhub.hookimpl
    def attnhub_register_backends(register):
        raise RuntimeError("cannot find libkernel.so")

    bad.attnhub_register_backends = attnhub_register_backends
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.add_plugin(bad)
        registry.add_plugin(plugin_of(good, name="good_plugin"))
    _assert_one_failure(registry, record, "bad_plugin",
                        "attnhub_register_backends raised RuntimeError: cannot find libkernel.so")
    assert registry.backends == {"good": good}


def test_duplicate_backend_name_is_a_failure():
    registry = Registry()
    first, second = make_backend("same", 5), make_backend("same", 9)
    registry.add_plugin(plugin_of(first, name="plugin_one"))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.add_plugin(plugin_of(second, name="plugin_two"))
    _assert_one_failure(registry, record, "plugin_two",
                        "backend name 'same' is already registered by plugin_one")
    assert registry.backends["same"] is first and registry.origins["same"] == "plugin_one"


@pytest.mark.parametrize("obj", [object(), "reference", attnhub.Backend],
                         ids=["object", "str", "class"])
def test_registering_a_non_backend_is_a_failure(obj):
    registry = Registry()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.add_plugin(plugin_of(obj, name="sloppy_plugin"))
    _assert_one_failure(registry, record, "sloppy_plugin",
                        "register() takes an attnhub.Backend instance")
    assert registry.backends == {}


def test_backend_without_name_is_a_failure():
    class Nameless(attnhub.Backend):
        device_types = frozenset({"cpu"})

    registry = Registry()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        registry.add_plugin(plugin_of(Nameless(), name="nameless_plugin"))
    _assert_one_failure(registry, record, "nameless_plugin", "Nameless has no name")
    assert registry.backends == {}


class _FakeEntryPoint:
    def __init__(self, name, value, load):
        self.name, self.value, self._load = name, value, load
        self.group = "attnhub"

    def load(self):
        return self._load()


def test_entry_points_register_backends_and_report_failures(monkeypatch):
    third = make_backend("third-party", 7)
    third_plugin = plugin_of(third, name="third_party_attn.plugin")
    loaded = []

    def broken():
        raise ImportError("third_party_broken needs CUDA 13")

    def builtin_again():
        loaded.append("builtin")  # never: the entry point naming a built-in is skipped
        return reference_plugin

    eps = [
        _FakeEntryPoint("third", "third_party_attn.plugin", lambda: third_plugin),
        _FakeEntryPoint("broken", "third_party_broken.plugin", broken),
        _FakeEntryPoint("reference", REFERENCE_PLUGIN, builtin_again),
    ]
    groups = []

    def fake_entry_points(**kwargs):
        groups.append(kwargs.get("group"))
        return eps

    registry = Registry()
    with monkeypatch.context() as m, warnings.catch_warnings(record=True) as record:
        m.setattr(importlib.metadata, "entry_points", fake_entry_points)
        warnings.simplefilter("always")
        registry.load()
    assert groups == ["attnhub"]
    assert loaded == []
    assert sorted(registry.backends) == ["fa3", "fa4", "flash-attn", "npu", "reference", "sdpa",
                                         "third-party", "torch-flash", "triton"]  # + built-ins
    assert registry.origins["third-party"] == "third (third_party_attn.plugin)"
    assert registry.origins["reference"] == REFERENCE_PLUGIN
    _assert_one_failure(registry, record, "broken (third_party_broken.plugin)",
                        "failed to load: ImportError: third_party_broken needs CUDA 13")
    try:
        reset_registry(registry)
        out = _call()
        assert third.calls == ["forward"]
        torch.testing.assert_close(out, _expected())
    finally:
        reset_registry()
