"""tools/upstream (the upstream-suite runner, docs/upstream-suites.md): exclusions match
their reasons, sampling is deterministic and per test function, shard reports merge, and the
import shim resolves flash_attn / flashinfer to attnhub's surfaces."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

TOOLS = Path(__file__).resolve().parents[1] / "tools" / "upstream"


@pytest.fixture
def plugin(monkeypatch):
    monkeypatch.syspath_prepend(str(TOOLS))
    module = importlib.import_module("upstream_plugin")
    module._excluded.clear()
    module._sampled_out.clear()
    return module


def _item(stem, func, params, i):
    return SimpleNamespace(module=SimpleNamespace(__name__=stem), originalname=func,
                           name=f"{func}[{i}]", nodeid=f"tests/{stem}.py::{func}[{i}]",
                           callspec=SimpleNamespace(params=params))


def test_exclusions_name_their_reason(plugin):
    drop = _item("test_flash_attn", "test_flash_attn_output", {"dropout_p": 0.17}, 0)
    keep = _item("test_flash_attn", "test_flash_attn_output", {"dropout_p": 0.0}, 1)
    private = _item("test_flash_attn", "test_flash_attn_varlen_paged_kv_num_splits", {}, 2)
    fp4 = _item("test_single_prefill", "test_single_prefill_with_kv_cache_nvfp4", {}, 3)
    assert "dropout-mask readback" in plugin._exclusion(drop)
    assert plugin._exclusion(keep) is None
    assert "private entry point" in plugin._exclusion(private)
    assert "NVFP4" in plugin._exclusion(fp4)


def test_sampling_is_deterministic_per_function(plugin, monkeypatch):
    monkeypatch.setenv("ATTNHUB_UPSTREAM_SAMPLE", "3")
    monkeypatch.setenv("ATTNHUB_UPSTREAM_SEED", "7")
    deselected = []
    config = SimpleNamespace(hook=SimpleNamespace(
        pytest_deselected=lambda items: deselected.extend(items)))

    def collect(order):
        items = [_item("test_x", f"test_{f}", {}, i) for f in "ab" for i in range(10)]
        items = [items[j] for j in order]
        plugin.pytest_collection_modifyitems(config, items)
        return sorted(it.nodeid for it in items)

    first = collect(range(20))
    again = collect(list(reversed(range(20))))
    assert first == again and len(first) == 6
    assert sum("test_a[" in n for n in first) == 3


def test_merge_and_table(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(TOOLS))
    run = importlib.import_module("run")
    part = {"sample": 2, "seed": "0", "exclusion_reasons": {"r": 1},
            "summary": {"t.py::test_a": {"passed": 1, "passed_on_kernel": 1}},
            "cases": {"t.py::test_a[0]": {"outcome": "passed"}}}
    other = {**part, "cases": {"t.py::test_a[1]": {"outcome": "failed"}},
             "summary": {"t.py::test_a": {"failed": 1}}, "exclusion_reasons": {}}
    paths = []
    for i, p in enumerate((part, other)):
        path = tmp_path / f"shard-{i}.json"
        path.write_text(json.dumps(p))
        paths.append(path)
    merged = run.merge(paths)
    assert merged["summary"]["t.py::test_a"] == {"passed": 1, "passed_on_kernel": 1, "failed": 1}
    assert len(merged["cases"]) == 2
    assert "| `test_a` | 1 | 1 | 0 | 1 |" in run.table(merged)


def test_shim_resolves_to_attnhub():
    code = ("import flash_attn, flashinfer, attnhub.flash_attn as fa, "
            "attnhub.compat.flashinfer as fi\n"
            "from flash_attn.flash_attn_interface import _get_block_size_n, USE_TRITON_ROCM\n"
            "from flash_attn.layers.rotary import apply_rotary_emb\n"
            "assert flash_attn.flash_attn_func is fa.flash_attn_func\n"
            "assert flashinfer.prefill.single_prefill_with_kv_cache is "
            "fi.single_prefill_with_kv_cache\n"
            "assert flashinfer.utils.has_flashinfer_jit_cache() and not USE_TRITON_ROCM\n")
    env = {"PYTHONPATH": str(TOOLS / "shim")}
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, **env})
