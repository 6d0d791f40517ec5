"""The attnhub command: --version, and every bad input gives a one-line message and exit
code 2, never a traceback."""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub.cli import main


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"attnhub {attnhub.__version__}"


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--device", "foo"], "'foo' is not a device"),
    (["run", "--heads", "0"], "--heads: expected an integer >= 1"),
    (["run", "--kv-heads", "x"], "--kv-heads: expected an integer"),
    (["run", "--head-dim", "-4"], "--head-dim: expected an integer >= 1"),
    (["run", "--repeats", "0"], "--repeats: expected an integer >= 1"),
    (["run", "--lengths", "0,0"], "--lengths: expected one or more lengths"),
    (["run", "--lengths", "a,b"], "--lengths: expected comma-separated ints"),
    (["run", "--window", "1,2,3"], "--window: expected LEFT,RIGHT"),
    (["conformance", "--device", "foo"], "'foo' is not a device"),
    (["conformance", "--report", "/nonexistent/x.md"], "folder '/nonexistent' does not exist"),
    (["conformance", "--json", "."], "'.' is a folder"),
    (["tune", "--device", "foo"], "'foo' is not a device"),
    (["tune", "--output", "/nonexistent/x.json"], "folder '/nonexistent' does not exist"),
    (["tune", "--budget-s", "soon"], "--budget-s: invalid float value"),
])
def test_bad_arguments_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", ["run", "conformance", "tune"])
def test_missing_device_is_a_usage_error(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--device", "cuda"])
    assert exc.value.code == 2
    assert "device 'cuda' is not available here" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["run", "--backend", "nosuch", "--lengths", "3"], "unknown attnhub backend 'nosuch'"),
    (["run", "--kv-heads", "3", "--lengths", "3"], "argument 'k': expected nheads_k dividing"),
    (["run", "--softcap", "-1", "--lengths", "3"], "argument 'softcap'"),
])
def test_rejected_calls_print_the_reason(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("attnhub run: ") and message in err


RUN_SMALL = ["run", "--lengths", "4,0,3", "--head-dim", "16", "--heads", "2", "--kv-heads",
             "1", "--repeats", "1"]


def test_run_passes_on_the_cpu(capsys):
    assert main(RUN_SMALL) == 0
    out = capsys.readouterr().out
    assert out.rstrip().endswith("PASS")
    for name in ("out", "lse", "dq", "dk", "dv"):
        assert f"    {name}" in out


def test_run_judges_with_the_conformance_rule(monkeypatch, capsys):
    """An lse off by 1e-3 (far above lse's 1e-4 floor) fails, with the suite's reason."""
    from attnhub import main_job

    real = main_job.attention_forward_varlen

    def skewed(*args, backend=None, **kwargs):
        out, lse = real(*args, backend=backend, **kwargs)
        return out, (lse if backend == "reference" else lse + 1e-3)

    monkeypatch.setattr(main_job, "attention_forward_varlen", skewed)
    assert main([*RUN_SMALL, "--no-grad"]) == 1
    lines = capsys.readouterr().out.splitlines()
    (lse_line,) = [line for line in lines if line.startswith("    lse")]
    assert "FAIL: error 1.000e-03 >" in lse_line and lines[-1] == "FAIL"
