"""pytest plugin for running upstream test files (flash-attention, FlashInfer) on attnhub.

Loaded by tools/upstream/run.py (``-p upstream_plugin``); never by attnhub's own test suite.
It does three things, configured through environment variables the driver sets:

* exclusions: test functions (or parameter values) outside what the surfaces claim are
  deselected, each with its reason (``EXCLUSIONS``; listed in docs/upstream-suites.md);
* sampling: ``ATTNHUB_UPSTREAM_SAMPLE`` = N keeps N cases per test function, chosen by a
  hash of (``ATTNHUB_UPSTREAM_SEED``, node id): deterministic, independent of collection
  order, and the same cases on every machine (0 = every case);
* sharding: ``ATTNHUB_UPSTREAM_SHARD`` = "i/K" keeps every K-th sampled case from the i-th
  (run.py --jobs K runs K pytest processes side by side; shard 0 reports the exclusion and
  sampling counts, so that merged counts are not repeated);
* bookkeeping: every attnhub backend call is recorded (backend name, device type), so the
  report tells a case that passed on a GPU kernel from one that fell back to the reference;
  the JSON report goes to ``ATTNHUB_UPSTREAM_REPORT``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict

import pytest

# (test file stem, test function or None for any, parameter name or None, predicate, reason)
EXCLUSIONS: list[tuple[str, str | None, str | None, object, str]] = [
    ("test_flash_attn", "test_flash_attn_varlen_paged_kv_num_splits", None, None,
     "private entry point: calls flash_attn_interface._flash_attn_varlen_forward"),
    ("test_flash_attn", "test_flash_attn_generator_arg_must_be_none", None, None,
     "C++ entry points: calls flash_attn_gpu.fwd / bwd / varlen_fwd / varlen_bwd"),
    ("test_flash_attn", None, "dropout_p", lambda p: p > 0,
     "dropout-mask readback: the test rebuilds flash_attn's kernel mask from S_dmask "
     "(attnhub's dropout uses its own generator; S_dmask's layout is flash_attn's)"),
    ("test_batch_prefill_kernels", "test_batch_prefill_with_paged_kv_cache_multi_item_scoring",
     None, None, "multi-item scoring (prefix_len_ptr, token_pos_in_items_ptr): not claimed; "
     "attnhub.compat.flashinfer raises InvalidArgumentError for it"),
    ("test_batch_prefill_kernels", "test_batch_prefill_paged_cta_tile_q_smem_probe_qk448_vo256",
     None, None, "head_dim_qk != head_dim_vo (448 / 256) and fp8 KV: not claimed (one head dim "
     "and one dtype for q, k, v)"),
    ("test_batch_prefill_kernels", None, "pos_encoding_mode", lambda m: m == "ALIBI",
     "pos_encoding_mode='ALIBI': not claimed (ALiBi goes through attention_forward_varlen's "
     "alibi_slopes); the compat layer raises InvalidArgumentError"),
    ("test_batch_prefill_kernels", None, "use_cuda_graph", lambda g: g is True,
     "upstream xfails it in the test body (FlashInfer disabled its CUDA-graph prefill cases)"),
    ("test_batch_prefill_kernels", None, "kv_dtype",
     lambda d: "float8" in str(d) or "uint8" in str(d),
     "fp8 KV cache: not claimed (one dtype for q, k, v)"),
]
NVFP4 = "NVFP4 KV caches: not claimed by attnhub.compat.flashinfer (one dtype for q, k, v)"

_calls: list[tuple[str, str]] = []
_records: dict[str, dict] = {}
_excluded: list[dict] = []
_sampled_out: Counter = Counter()


def _exclusion(item) -> str | None:
    stem = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    func = getattr(item, "originalname", item.name)
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "nvfp4" in func:
        return NVFP4
    for file_stem, name, param, pred, reason in EXCLUSIONS:
        if file_stem != stem or (name is not None and name != func):
            continue
        if param is None:
            return reason
        if param in params and pred(params[param]):  # type: ignore[operator]
            return reason
    return None


def _function_key(item) -> str:
    return f"{item.nodeid.split('::')[0]}::{getattr(item, 'originalname', item.name)}"


@pytest.hookimpl(trylast=True)  # after -k / -m deselection: counts only the cases in play
def pytest_collection_modifyitems(config, items):
    sample = int(os.environ.get("ATTNHUB_UPSTREAM_SAMPLE", "0"))
    seed = os.environ.get("ATTNHUB_UPSTREAM_SEED", "0")
    keep, drop = [], []
    groups: dict[str, list] = defaultdict(list)
    for item in items:
        reason = _exclusion(item)
        if reason is not None:
            _excluded.append({"nodeid": item.nodeid, "function": _function_key(item),
                              "reason": reason})
            drop.append(item)
        else:
            groups[_function_key(item)].append(item)
    for key, group in groups.items():
        if sample > 0 and len(group) > sample:
            group = sorted(group, key=lambda it: hashlib.sha1(
                f"{seed}:{it.nodeid}".encode()).hexdigest())
            drop.extend(group[sample:])
            _sampled_out[key] += len(group) - sample
            group = group[:sample]
        keep.extend(group)
    order = {id(it): i for i, it in enumerate(items)}
    keep.sort(key=lambda it: order[id(it)])  # upstream order among the kept cases
    shard, shards = (int(x) for x in os.environ.get("ATTNHUB_UPSTREAM_SHARD", "0/1").split("/"))
    if shards > 1:
        drop.extend(it for j, it in enumerate(keep) if j % shards != shard)
        keep = [it for j, it in enumerate(keep) if j % shards == shard]
        if shard != 0:
            _excluded.clear()
            _sampled_out.clear()
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep


def _wrap(backend) -> None:
    name = backend.name

    def recorder(method):
        def wrapped(problem, *args, **kwargs):
            _calls.append((name, problem.device_type))
            return method(problem, *args, **kwargs)
        return wrapped

    for attr in ("forward", "forward_out", "backward"):
        setattr(backend, attr, recorder(getattr(backend, attr)))
    runner_factory = backend.out_only_runner

    def out_only_runner(problem):
        run = runner_factory(problem)

        def recorded(*args, **kwargs):
            _calls.append((name, problem.device_type))
            return run(*args, **kwargs)
        return recorded

    backend.out_only_runner = out_only_runner


def pytest_configure(config):
    if os.environ.get("ATTNHUB_UPSTREAM_CPU") == "1":  # run.py --cpu: a smoke run, no GPU
        import torch

        torch.cuda.get_device_capability = lambda device=None: (9, 0)
        torch.cuda.synchronize = lambda device=None: None
        torch.cuda.empty_cache = lambda: None


def pytest_sessionstart(session):
    from attnhub.registry import get_registry

    for backend in get_registry().backends.values():
        _wrap(backend)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _calls.clear()
    yield
    _records.setdefault(item.nodeid, {})["backends"] = sorted(
        f"{n}@{d}" for n, d in set(_calls))


def pytest_runtest_logreport(report):
    rec = _records.setdefault(report.nodeid, {})
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.outcome == "skipped" else "xpassed"
        rec["outcome"] = outcome
        if report.outcome == "skipped" and isinstance(report.longrepr, tuple):
            rec["reason"] = str(report.longrepr[2])[:300]
        elif report.outcome == "failed":
            rec["reason"] = str(getattr(report, "longreprtext", ""))[-1500:]
        rec["seconds"] = round(report.duration, 3)


def _summary() -> dict:
    per_function: dict[str, Counter] = defaultdict(Counter)
    for nodeid, rec in _records.items():
        key = nodeid.split("[")[0]
        outcome = rec.get("outcome", "unknown")
        per_function[key][outcome] += 1
        backends = rec.get("backends", [])
        if outcome == "passed":
            fell_back = any(b.startswith("reference@") and not b.endswith("@cpu")
                            for b in backends)
            per_function[key]["passed_on_reference" if fell_back else "passed_on_kernel"] += 1
    for ex in _excluded:
        per_function[ex["function"]]["excluded"] += 1
    for key, n in _sampled_out.items():
        per_function[key]["not_sampled"] += n
    return {k: dict(v) for k, v in sorted(per_function.items())}


def pytest_sessionfinish(session, exitstatus):
    path = os.environ.get("ATTNHUB_UPSTREAM_REPORT")
    if not path:
        return
    reasons = Counter(ex["reason"] for ex in _excluded)
    with open(path, "w") as f:
        json.dump({"sample": int(os.environ.get("ATTNHUB_UPSTREAM_SAMPLE", "0")),
                   "seed": os.environ.get("ATTNHUB_UPSTREAM_SEED", "0"),
                   "summary": _summary(), "exclusion_reasons": dict(reasons),
                   "cases": _records}, f, indent=1, default=str)
