"""`attnhub conformance`: exit status, both reports, -k filtering, unknown backends."""

from __future__ import annotations

import dataclasses
import json
import types

import pytest
import torch
from attnhub.backends.reference import kernel
from attnhub.backends.reference import plugin as reference_plugin
from attnhub.conformance.cases import quick_cases

import attnhub
from attnhub.cli import main
from attnhub.registry import Registry, reset_registry


class ScaleTooLarge(attnhub.Backend):
    name = "scale-too-large"
    device_types = frozenset({"cpu"})
    capabilities = attnhub.Capabilities(dtypes=frozenset({torch.float16, torch.float32}))

    def forward(self, problem, inputs):
        return kernel.forward(dataclasses.replace(problem, scale=problem.scale * 1.05), inputs)

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        bent = dataclasses.replace(problem, scale=problem.scale * 1.05)
        return kernel.backward(bent, inputs, dout, dlse)


@pytest.fixture
def with_broken_backend():
    registry = Registry()
    registry.add_plugin(reference_plugin)
    plugin = types.ModuleType("cli_double")
    plugin.attnhub_register_backends = attnhub.hookimpl(
        lambda register: register(ScaleTooLarge()))
    registry.add_plugin(plugin)
    assert registry.names() == ["reference", "scale-too-large"]
    reset_registry(registry)
    yield
    reset_registry()


def _args(tmp_path, *extra):
    return ["conformance", *extra, "--report", str(tmp_path / "report.md"),
            "--json", str(tmp_path / "report.json")]


def test_paged_cases_on_the_reference_pass_and_write_both_reports(tmp_path, capsys):
    assert main(_args(tmp_path, "--backend", "reference", "-k", "paged")) == 0
    paged = [c.id for c in quick_cases() if "paged" in c.id]
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["tier"] == "quick" and data["environment"]["device"] == "cpu"
    assert [r["case"] for r in data["results"]] == paged and len(paged) == 20  # 1: sinks
    assert {r["backend"] for r in data["results"]} == {"reference"}
    assert all(r["status"] == "pass" and r["checks"] for r in data["results"])
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# attnhub conformance: quick tier")
    assert f"| reference | pass {len(paged) - 1} | pass 1 | pass {len(paged)} |" in md
    assert "## Failures" not in md
    out = capsys.readouterr().out
    assert f"{len(paged)} passed, 0 failed, 0 unsupported" in out


def test_unknown_backend_exits_2_without_reports(tmp_path, capsys):
    assert main(_args(tmp_path, "--backend", "no-such-backend", "-k", "paged")) == 2
    err = capsys.readouterr().err
    assert "no-such-backend" in err and "reference" in err  # names the registered ones
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.json").exists()


def test_a_failing_backend_exits_1_and_the_reports_say_why(tmp_path, capsys,
                                                          with_broken_backend):
    case = next(c for c in quick_cases() if c.feature == "dtype-headdim"
                and c.dtype == torch.float32 and c.head_dim == 72)
    code = main(_args(tmp_path, "--backend", "reference", "--backend", "scale-too-large",
                      "-k", case.id))
    assert code == 1
    out = capsys.readouterr().out
    assert f"scale-too-large {case.id}: fail" in out
    assert "1 passed, 1 failed" in out
    data = json.loads((tmp_path / "report.json").read_text())
    status = {r["backend"]: r["status"] for r in data["results"]}
    assert status == {"reference": "pass", "scale-too-large": "fail"}
    md = (tmp_path / "report.md").read_text()
    assert "| scale-too-large | **FAIL 1** | **FAIL 1** |" in md
    assert f"| scale-too-large | {case.id} | out |" in md


def test_default_backends_are_the_ones_registered_for_the_device(tmp_path, capsys,
                                                                 with_broken_backend):
    # No --backend: every available backend registered for the CPU (the reference and the
    # double). The double declines bf16 (unsupported, with its reason) and fails the rest.
    assert main(_args(tmp_path, "--device", "cpu", "-k", "gqa-6-1-")) == 1
    data = json.loads((tmp_path / "report.json").read_text())
    got = {(r["backend"], r["case"].split("-")[3], r["status"]) for r in data["results"]}
    assert got == {("reference", "fp16", "pass"), ("reference", "bf16", "pass"),
                   ("reference", "fp32", "pass"), ("scale-too-large", "fp16", "fail"),
                   ("scale-too-large", "bf16", "unsupported"),
                   ("scale-too-large", "fp32", "fail")}
    bf16 = next(r for r in data["results"] if r["status"] == "unsupported")
    assert bf16["reasons"] == ["dtype bfloat16 is not supported (supported: float16, float32)"]
    assert "3 passed, 2 failed, 1 unsupported" in capsys.readouterr().out


def test_repeated_k_keeps_cases_matching_any(tmp_path):
    assert main(_args(tmp_path, "--backend", "reference", "-k", "paged-zeros", "-k",
                      "gqa-4-4-fp32")) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    ids = {r["case"] for r in data["results"]}
    assert ids and all("paged-zeros" in i or "gqa-4-4-fp32" in i for i in ids)
    assert any("paged-zeros" in i for i in ids) and any("gqa-4-4-fp32" in i for i in ids)


def test_feature_filter_keeps_whole_report_columns(tmp_path):
    assert main(_args(tmp_path, "--backend", "reference", "--feature", "causal")) == 0
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["results"] and {r["feature"] for r in data["results"]} == {"causal"}


def test_unknown_feature_is_an_error_listing_the_valid_ones(tmp_path, capsys):
    assert main(_args(tmp_path, "--backend", "reference", "--feature", "windows")) == 2
    err = capsys.readouterr().err
    assert "unknown --feature windows" in err and "window" in err and "paged" in err
    assert not (tmp_path / "report.md").exists()


def test_a_selection_matching_no_case_exits_2_without_reports(tmp_path, capsys):
    assert main(_args(tmp_path, "--backend", "reference", "-k", "no-such-case")) == 2
    err = capsys.readouterr().err
    assert "no case of the quick tier matches -k no-such-case" in err
    assert "nothing was checked" in err
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "report.json").exists()


def test_a_backend_that_checked_nothing_fails_and_says_why(tmp_path, capsys,
                                                           with_broken_backend):
    # The double declines bfloat16: on bf16 cases alone it checks nothing.
    assert main(_args(tmp_path, "--backend", "reference", "--backend", "scale-too-large",
                      "-k", "gqa-6-1-bf16")) == 1
    err = capsys.readouterr().err
    assert "backend 'scale-too-large' checked nothing on cpu" in err
    assert "dtype bfloat16 is not supported" in err
    md = (tmp_path / "report.md").read_text()
    assert "| backend | gqa | total |" in md  # a well-formed table, with the reasons
