"""The conformance suite through the drop-in surfaces: a handful of quick cases per surface on
the reference, from Python and from `attnhub conformance --surface`."""

from __future__ import annotations

import json

import pytest

from attnhub.cli import main
from attnhub.conformance import quick_cases, run_case
from attnhub.conformance.surfaces import SURFACES

# A case every surface can express, and ones some cannot (the dropout case has sq != sk,
# which Paddle's packed qkv cannot hold).
PICK = ("gqa-8-2-fp32", "dropout-short-fp32", "window-uniform-fp16-d64-h4-2-w3_-1",
        "paged-uniform-fp16-d64-h4-2-causal-page3", "softcap-uniform-fp16-d64-h4-2-cap5")


def _cases():
    cases = quick_cases()
    return [next(c for c in cases if c.id.startswith(prefix)) for prefix in PICK]


@pytest.mark.parametrize("surface", sorted(SURFACES))
def test_surfaces_pass_or_state_their_gaps(surface):
    results = {c.id: run_case(c, "reference", "cpu", surface) for c in _cases()}
    for case_id, r in results.items():
        assert r.surface == surface and r.label == f"reference via {surface}"
        assert r.status in ("pass", "unsupported"), r.describe()
        if r.status == "unsupported":
            assert all(reason.startswith(f"surface {surface}:") for reason in r.reasons)
        else:
            assert {c.output for c in r.checks} >= {"out"}, case_id
    passed = {i.split("-")[0] for i, r in results.items() if r.status == "pass"}
    assert "gqa" in passed
    grads = [c.output for r in results.values() for c in r.checks]
    assert "dq" in grads and "dv" in grads
    unsupported = {i for i, r in results.items() if r.status == "unsupported"}
    expected = {"flash_attn": set(), "flashattention_plus": {"paged", "softcap"},
                "paddle": {"window", "paged", "softcap", "dropout"}}[surface]  # sq != sk there
    assert {i.split("-")[0] for i in unsupported} == expected


def test_cli_surface_option(tmp_path, capsys):
    args = ["conformance", "--backend", "reference", "--surface", "paddle", "-k", "gqa-8-2-fp32",
            "-k", "zeros", "--report", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")]
    assert main(args) == 0
    data = json.loads((tmp_path / "r.json").read_text())
    statuses = {r["case"]: r["status"] for r in data["results"]}
    assert {r["surface"] for r in data["results"]} == {"paddle"}
    assert "pass" in statuses.values() and "unsupported" in statuses.values()
    assert "reference via paddle" in (tmp_path / "r.md").read_text()
    assert "via paddle" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["conformance", "--surface", "nope"])
