"""The conformance suite fails broken backends, on exactly the features their bugs touch.

Each test double is the reference kernel with one bug injected, registered in a fresh
registry through the plugin hook like any third-party backend. A double must FAIL every quick
case its bug changes and, as a control, PASS the cases its bug does not touch.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import types

import pytest
import torch
from attnhub.backends.reference import kernel
from attnhub.backends.reference import plugin as reference_plugin
from attnhub.conformance import dense, report
from attnhub.conformance.cases import Case, quick_cases
from attnhub.conformance.runner import CaseResult, run_case

import attnhub
from attnhub.registry import Registry, reset_registry

ALL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
QUICK = quick_cases()


class Double(attnhub.Backend):
    """The reference kernel run on ``bent(problem)``: the bug is a changed problem."""

    device_types = frozenset({"cpu"})
    capabilities = attnhub.Capabilities(dtypes=ALL_DTYPES, sinks=True)

    def bent(self, problem: attnhub.VarlenProblem) -> attnhub.VarlenProblem:
        return problem

    def forward(self, problem, inputs):
        return kernel.forward(self.bent(problem), inputs)

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        return kernel.backward(self.bent(problem), inputs, dout, dlse)


def _off_by_one(window: tuple[int, int]) -> tuple[int, int]:
    left, right = window
    if left >= 0:
        return left + 1, right
    if right > 0:
        return left, right + 1
    return window


class WindowOffByOne(Double):
    """A finite left window side is one key too wide (else a right side > 0 is)."""

    name = "broken-window"

    def bent(self, problem):
        return dataclasses.replace(problem, window=_off_by_one(problem.window))


class WrongScale(Double):
    """The softmax scale is 5 % too large for head dims above 64."""

    name = "broken-scale"

    def bent(self, problem):
        if problem.head_dim <= 64:
            return problem
        return dataclasses.replace(problem, scale=problem.scale * 1.05)


class DroppedSoftcap(Double):
    """Claims softcap support (the default capabilities) and ignores it."""

    name = "broken-softcap"

    def bent(self, problem):
        return dataclasses.replace(problem, softcap=0.0)


def _seq_bounds(inputs: attnhub.VarlenInputs) -> list[tuple[int, int]]:
    cu = inputs.cu_seqlens_q.tolist()
    return list(itertools.pairwise(cu))


class MissesLastRow(Double):
    """out and lse come from torch.empty, and the last query row of the whole batch is never
    written."""

    name = "broken-last-row"

    def forward(self, problem, inputs):
        res = kernel.forward(problem, inputs)
        out, lse = torch.empty_like(res.out), torch.empty_like(res.lse)
        out[:-1], lse[:, :-1] = res.out[:-1], res.lse[:, :-1]
        return res._replace(out=out, lse=lse)


class MissesSequenceLastRow(Double):
    """A per-sequence loop with an off-by-one bound: the last row of every sequence is left
    as torch.empty gave it, in out and lse."""

    name = "broken-seq-last-row"

    def forward(self, problem, inputs):
        res = kernel.forward(problem, inputs)
        out, lse = torch.empty_like(res.out), torch.empty_like(res.lse)
        for q0, q1 in _seq_bounds(inputs):
            out[q0:q1 - 1], lse[:, q0:q1 - 1] = res.out[q0:q1 - 1], res.lse[:, q0:q1 - 1]
        return res._replace(out=out, lse=lse)


class MissesDqRow(Double):
    """Backward leaves the last dq row of every sequence as torch.empty gave it."""

    name = "broken-dq-row"

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        grads = kernel.backward(problem, inputs, dout, dlse)
        dq = torch.empty_like(grads.dq)
        for q0, q1 in _seq_bounds(inputs):
            dq[q0:q1 - 1] = grads.dq[q0:q1 - 1]
        return grads._replace(dq=dq)


class ReadsPastEnd(Double):
    """Loads keys in pairs without a bounds check: for a sequence of odd length it reads the
    row after its last key and "masks" it by multiplying with 0. Inside the batch that row is
    the next sequence's (finite, harmless); after the last sequence it is the NaN padding, and
    0 * NaN = NaN."""

    name = "broken-overread"
    capabilities = attnhub.Capabilities(dtypes=ALL_DTYPES, page_size_multiple=None,
                                        dropout=False)

    def forward(self, problem, inputs):
        res = kernel.forward(problem, inputs)
        v = inputs.v
        rows = torch.as_strided(v, (v.shape[0] + 1, *v.shape[1:]), v.stride(),
                                v.storage_offset())
        cu_k = inputs.cu_seqlens_k.tolist()
        for b, (q0, q1) in enumerate(_seq_bounds(inputs)):
            k0, k1 = cu_k[b], cu_k[b + 1]
            if (k1 - k0) % 2:
                extra = rows[k1].repeat_interleave(problem.group_size, dim=0)  # (nheads, d)
                res.out[q0:q1] += 0.0 * extra
        return res


class DropoutIgnoresSeed(Double):
    """Draws its dropout mask from a fixed seed pair instead of torch's generator."""

    name = "broken-dropout-seed"

    def forward(self, problem, inputs):
        if problem.dropout_p > 0:
            fixed = torch.tensor([12345, 6789], dtype=torch.int64, device=inputs.q.device)
            inputs = dataclasses.replace(inputs, rng_state=fixed)
        return kernel.forward(problem, inputs)


class DropoutWrongRate(Double):
    """Drops half as many entries as asked (and rescales for that rate)."""

    name = "broken-dropout-rate"

    def bent(self, problem):
        return dataclasses.replace(problem, dropout_p=problem.dropout_p / 2)


class IgnoresSinks(Double):
    """Claims sinks and leaves them out of the forward's softmax (its backward is right)."""

    name = "broken-sinks-ignored"

    def forward(self, problem, inputs):
        return kernel.forward(dataclasses.replace(problem, sinks=False), inputs)


class ZeroDsinks(Double):
    """Claims sinks, computes them, and hands back a zero gradient for them."""

    name = "broken-dsinks"

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        grads = kernel.backward(problem, inputs, dout, dlse)
        if grads.dsinks is None:
            return grads
        return grads._replace(dsinks=torch.zeros_like(grads.dsinks))


DOUBLES = (IgnoresSinks, ZeroDsinks, WindowOffByOne, WrongScale, DroppedSoftcap, MissesLastRow,
           MissesSequenceLastRow, MissesDqRow, ReadsPastEnd, DropoutIgnoresSeed, DropoutWrongRate)


@pytest.fixture
def doubles():
    """A fresh registry holding the reference (the oracle) and every double."""
    registry = Registry()
    registry.add_plugin(reference_plugin)
    plugin = types.ModuleType("broken_doubles")

    @attnhub.hookimpl
    def attnhub_register_backends(register):
        for cls in DOUBLES:
            register(cls())

    plugin.attnhub_register_backends = attnhub_register_backends
    registry.add_plugin(plugin)
    assert not registry.failures, registry.failures
    reset_registry(registry)
    yield registry
    reset_registry()


def _cases(feature: str, *, dtype: torch.dtype | None = None, where=None) -> list[Case]:
    out = [c for c in QUICK if c.feature == feature and (dtype is None or c.dtype == dtype)
           and (where is None or where(c))]
    assert out, f"no quick case for {feature}"
    return out


def _run(case: Case, backend: str) -> CaseResult:
    return run_case(case, backend, "cpu")


def _assert_fails(result: CaseResult, output: str | None = None) -> None:
    assert result.status == "fail", result.describe()
    if output is not None:
        assert any(c.output == output and not c.ok for c in result.checks), result.describe()


def _assert_passes(result: CaseResult) -> None:
    assert result.status == "pass", result.describe()


def _effective_window(case: Case) -> tuple[int, int]:
    left, right = case.window or (-1, -1)
    return (left, 0) if case.causal else (left, right)


def _window_bug_shows(case: Case) -> bool:
    """Whether the widened window changes any sequence's mask (then out must differ)."""
    window = _effective_window(case)
    return any(
        not torch.equal(dense.visible(sq, sk, window), dense.visible(sq, sk, _off_by_one(window)))
        for sq, sk in zip(case.seqlens_q, case.seqlens_k, strict=True) if sq and sk)


def test_off_by_one_window_fails_window_cases(doubles):
    window_cases = _cases("window")[::3]  # a third of the 36 (all fp16): CI time
    assert sum(_window_bug_shows(c) for c in window_cases) > len(window_cases) // 2
    for case in window_cases:
        result = _run(case, "broken-window")
        if _window_bug_shows(case):
            _assert_fails(result, "out")
        else:  # window (-1, 2) with causal: causal sets right = 0, plain causal
            _assert_passes(result)
    # Control: plain causal masks (left unbounded, right 0) are untouched by the bug.
    for case in _cases("causal", dtype=torch.float32):
        assert _off_by_one(_effective_window(case)) == _effective_window(case)
        _assert_passes(_run(case, "broken-window"))


def test_wrong_scale_fails_the_head_dims_it_touches(doubles):
    for case in _cases("dtype-headdim", dtype=torch.float32):
        result = _run(case, "broken-scale")
        if case.head_dim > 64:
            _assert_fails(result, "out")
            assert not next(c for c in result.checks if c.output == "lse").ok
        else:
            _assert_passes(result)


def test_dropped_softcap_fails_softcap_cases(doubles):
    for case in _cases("softcap"):
        assert case.softcap > 0
        _assert_fails(_run(case, "broken-softcap"), "out")
    for case in _cases("gqa", dtype=torch.float32)[:2]:  # control: no softcap, no bug
        _assert_passes(_run(case, "broken-softcap"))


def test_sink_bugs_fail_the_sinks_cases(doubles):
    # Zero-length sequences (rows that see no key: lse = sink), paged, forward only: CI time
    sinks_cases = _cases("sinks", where=lambda c: c.label in ("zeros", "paged", "forward-only")
                         and (c.causal or not c.grad))
    assert any(not c.grad for c in sinks_cases) and any(c.page_size for c in sinks_cases)
    for case in sinks_cases:
        result = _run(case, "broken-sinks-ignored")
        _assert_fails(result, "out")
        assert not next(c for c in result.checks if c.output == "lse").ok
        if case.grad:
            result = _run(case, "broken-dsinks")
            _assert_fails(result, "dsinks")
            assert all(c.ok for c in result.checks if c.output != "dsinks"), result.describe()
    for case in _cases("gqa", dtype=torch.float32)[:1]:  # control: no sinks, no bug
        _assert_passes(_run(case, "broken-sinks-ignored"))
        _assert_passes(_run(case, "broken-dsinks"))


def _one_per_feature() -> list[Case]:
    """The first fp32 case of every feature (the first case where a feature has no fp32)."""
    chosen: dict[str, Case] = {}
    for case in QUICK:
        if case.feature not in chosen or (case.dtype == torch.float32
                                          and chosen[case.feature].dtype != torch.float32):
            chosen[case.feature] = case
    return list(chosen.values())


@pytest.mark.parametrize("backend", ["broken-last-row", "broken-seq-last-row"])
def test_unwritten_output_rows_read_nan(doubles, backend):
    """torch.empty memory is NaN while the backend runs, so an unwritten row can never pass
    by luck (a stale zero, or stale correct values)."""
    for case in _one_per_feature():
        result = _run(case, backend)
        _assert_fails(result, "out")
        bad = next(c for c in result.checks if c.output == "out")
        assert "NaN" in bad.failure, result.describe()
        if case.dropout_p == 0:
            assert "NaN" in next(c for c in result.checks if c.output == "lse").failure


def test_unwritten_dq_rows_read_nan(doubles):
    # Window (0, 0): each query sees one key, so the true dq is exactly 0 and memory that
    # happened to hold zeros would pass. Poisoned allocations make it NaN.
    zero_dq = _cases("window", where=lambda c: _effective_window(c) == (0, 0))
    assert len(zero_dq) == 4
    for case in [*zero_dq, _cases("gqa", dtype=torch.float32)[0]]:
        result = _run(case, "broken-dq-row")
        _assert_fails(result, "dq")
        assert "NaN" in next(c for c in result.checks if c.output == "dq").failure
        assert all(c.ok for c in result.checks if c.output != "dq"), result.describe()
    for case in _cases("forward-only"):  # control: no backward, no bug
        _assert_passes(_run(case, "broken-dq-row"))


def _reads_nan_padding(case: Case) -> bool:
    """Some sequence ends at the last key row, has odd length and has query rows."""
    total = sum(case.seqlens_k)
    end = 0
    for sq, sk in zip(case.seqlens_q, case.seqlens_k, strict=True):
        end += sk
        if end == total and sk % 2 and sq:
            return True
    return False


def test_reading_past_the_end_hits_the_nan_padding(doubles):
    lengths = _cases("lengths", dtype=torch.float32)
    assert {_reads_nan_padding(c) for c in lengths} == {True, False}
    for case in lengths:
        result = _run(case, "broken-overread")
        if _reads_nan_padding(case):
            _assert_fails(result, "out")
            assert "NaN" in next(c for c in result.checks if c.output == "out").failure
        else:  # control: odd sequences inside the batch read the next one's finite rows
            _assert_passes(result)
    # Honest capabilities: what it declines is unsupported, never a failure.
    result = _run(_cases("paged")[0], "broken-overread")
    assert result.status == "unsupported"
    assert result.reasons == ["paged KV (block_table) is not supported"]


def test_dropout_that_ignores_the_seed_fails(doubles):
    for case in _cases("dropout"):
        result = _run(case, "broken-dropout-seed")
        assert result.status == "fail", result.describe()
        assert any("ignores the seed" in r for r in result.reasons), result.describe()
    _assert_passes(_run(_cases("causal", dtype=torch.float32)[0], "broken-dropout-seed"))


def test_dropout_with_the_wrong_keep_rate_fails(doubles):
    for case in _cases("dropout"):
        result = _run(case, "broken-dropout-rate")
        _assert_fails(result, "keep-rate")
        assert any(r.startswith("keep rate") for r in result.reasons)
    _assert_passes(_run(_cases("causal", dtype=torch.float32)[0], "broken-dropout-rate"))


def test_reference_passes_the_cases_used_above(doubles):
    """The oracle itself passes a sample of the same cases, so the failures are the bugs'."""
    for case in (_cases("window")[0], _cases("softcap")[0], _cases("dropout")[0],
                 _cases("dtype-headdim", dtype=torch.float32)[-1]):
        _assert_passes(_run(case, "reference"))


def test_report_shows_failures_with_error_figures(doubles):
    d72 = _cases("dtype-headdim", dtype=torch.float32, where=lambda c: c.head_dim == 72)[0]
    paged = _cases("paged")[0]
    results = [_run(d72, "reference"), _run(paged, "reference"),
               _run(d72, "broken-scale"), _run(paged, "broken-overread")]
    assert [r.status for r in results] == ["pass", "pass", "fail", "unsupported"]

    md = report.markdown(results, "quick", "cpu")
    lines = md.splitlines()
    top = next(i for i, line in enumerate(lines) if line.startswith("| backend | "))
    matrix = lines[top + 2:lines.index("", top)]
    rows = {line.split("|")[1].strip(): line for line in matrix}
    assert set(rows) == {"reference", "broken-scale", "broken-overread"}
    assert "**FAIL 1**" in rows["broken-scale"] and "pass" not in rows["broken-scale"]
    assert "**FAIL" not in rows["reference"] and "pass 2" in rows["reference"]
    assert "unsupported 1" in rows["broken-overread"]
    assert "## Failures" in md and "## Unsupported" in md
    failure_rows = [line for line in md.splitlines()
                    if line.startswith(f"| broken-scale | {d72.id} |")]
    assert {line.split("|")[3].strip() for line in failure_rows} >= {"out", "lse"}
    for line in failure_rows:  # error and tolerance figures, error above tolerance
        error, tol = (float(x) for x in re.findall(r"\| (\d\.\d{3}e[+-]\d\d) ", line)[:2])
        assert error > tol > 0
    assert "paged KV (block_table) is not supported" in md

    data = json.loads(report.as_json(results, "quick", "cpu"))
    assert data["tier"] == "quick" and data["environment"]["device"] == "cpu"
    assert [r["status"] for r in data["results"]] == ["pass", "pass", "fail", "unsupported"]
    bad = [c for c in data["results"][2]["checks"] if c["failure"]]
    assert bad and all(c["error"] > c["tolerance"] > 0 for c in bad)
    assert data["results"][3]["reasons"] == ["paged KV (block_table) is not supported"]
