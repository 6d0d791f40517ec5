"""`attnhub tune` on the CPU (sdpa vs reference, one tiny class), the table it writes, its use
by selection, and `attnhub info`'s report of it."""

from __future__ import annotations

import json
import random

import pytest
import torch

import attnhub
from attnhub import cli, cost_tables, tune
from attnhub.problem import VarlenProblem
from attnhub.problem_class import TINY_WORK, ProblemClass, classify, size_bucket

CLASS = "float32/d64/g2-8/none/tiny/fwd"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNHUB_CACHE_DIR", str(tmp_path))
    return tmp_path


def test_tune_writes_the_user_table_that_selection_and_info_use(cache, capsys):
    assert cli.main(["tune", "--device", "cpu", "--classes", CLASS, "--rep-ms", "5"]) == 0
    printed = capsys.readouterr().out
    path = cost_tables.user_table_path(cost_tables.device_identity("cpu"))
    assert path.parent == cache and str(path) in printed
    assert f"[1/1] {CLASS}: sdpa" in printed and "reference" in printed
    table = cost_tables.read_table(path)
    assert set(table.classes) == {CLASS}
    assert set(table.classes[CLASS]) == {"sdpa", "reference"}
    assert table.extra["shapes"][CLASS].startswith("8 seqs, 512 q / 512 k tokens")

    # Selection reads it: a call of that class is ranked by the measured figures.
    case = tune.TuneCase(torch.float32, 64, "2-8", "none", "tiny", False)
    kwargs = tune.build_call(case, torch.device("cpu"))
    expl = attnhub.explain(**kwargs)
    fastest = min(table.classes[CLASS], key=table.classes[CLASS].get)
    assert f"measured cost of class {CLASS}" in expl.basis
    assert expl.selected == fastest or table.classes[CLASS][expl.selected] <= \
        1.03 * table.classes[CLASS][fastest]

    assert cli.main(["info"]) == 0
    info = capsys.readouterr().out
    assert f"cpu ({cost_tables.device_identity('cpu').name}): user-tuned table {path} " \
           "(1 classes)" in info
    data = cli.info_mod.collect()["selection"]
    assert data["mode"] == "measured" and data["devices"]["cpu"]["tables"][0]["path"] == str(path)

    # --resume skips what the table holds; nothing is rewritten.
    before = path.read_text()
    assert cli.main(["tune", "--device", "cpu", "--classes", CLASS, "--resume"]) == 0
    assert "measured 0 classes" in capsys.readouterr().out
    assert path.read_text() == before


def test_info_without_a_table_says_how_to_make_one(cache, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "selection: measured" in out
    assert "no cost table (`attnhub tune --device cpu` writes " in out


def test_tune_list_and_patterns(capsys):
    assert cli.main(["tune", "--device", "cpu", "--list", "--classes", "*/tiny/fwd"]) == 0
    keys = capsys.readouterr().out.split()
    assert CLASS in keys and all(k.endswith("/tiny/fwd") for k in keys)
    for key in keys:
        ProblemClass.parse(key)


def test_tune_cases_classify_as_intended():
    """The CPU list's small representative calls fall in the class they stand for (every
    mask; one head dim and GQA ratio: those are read from the shapes as built)."""
    for case in tune.default_cases("cpu"):
        if case.length in ("tiny", "tiny-host", "decode") and case.head_dim == 64 \
                and case.group == "2-8":
            problem = tune.problem_of(tune.build_call(case, torch.device("cpu")))
            assert classify(problem, size_bucket(problem)) == case.intended(), case


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
@pytest.mark.parametrize("length", ["short", "medium", "long"])
def test_representative_lengths_fall_in_their_bucket(device_type, length):
    """Checked on lengths alone (the larger calls are not built here): above the tiny work
    for the smallest heads x head dim of the lists (16 x 64), and in their max_seqlen range."""
    sq, sk = tune.representative_lengths(length, device_type, random.Random(0))
    assert sum(sq) * max(sk) * 16 * 64 > TINY_WORK
    p = VarlenProblem("cpu", torch.float32, len(sq), sum(sq), sum(sk), 16, 16, 64, max(sq),
                      max(sk), 1.0)
    assert size_bucket(p) == length


def test_shipped_table_from_match_name(cache, tmp_path, capsys):
    out = tmp_path / "family.json"
    assert cli.main(["tune", "--device", "cpu", "--classes", CLASS, "--rep-ms", "5",
                     "--backend", "sdpa", "--output", str(out), "--match-name", "EPYC|Xeon"]) == 0
    data = json.loads(out.read_text())
    assert data["match"] == {"type": "cpu", "capability": None, "name_pattern": "EPYC|Xeon"}
    table = cost_tables.CostTable.from_json(data, "shipped", str(out))
    assert set(table.classes[CLASS]) == {"sdpa"}


def test_tune_unknown_backend_is_an_error(cache, capsys):
    assert cli.main(["tune", "--device", "cpu", "--backend", "nope", "--classes", CLASS]) == 2
    assert "unknown attnhub backend 'nope' (from attnhub tune --backend)" in capsys.readouterr().err


def test_remeasuring_one_backend_keeps_the_others_entries(cache, capsys):
    """`--backend sdpa` into a table that holds sdpa and reference figures: sdpa's entry is
    re-measured, reference's kept (its date too), a backend the run measured but could not
    run loses its old entry."""
    path = cost_tables.user_table_path(cost_tables.device_identity("cpu"))
    assert cli.main(["tune", "--device", "cpu", "--classes", CLASS, "--rep-ms", "5"]) == 0
    first = cost_tables.read_table(path)
    first.classes[CLASS] = {"sdpa": 1e6, "reference": 123.0}
    first.extra["measured_backends"]["reference"] = "2000-01-01"
    first.extra["versions"]["flash-attn-4"] = "4.0.0b36"  # an fa4 column from another run
    cost_tables.write_table(first, path)
    capsys.readouterr()
    assert cli.main(["tune", "--device", "cpu", "--classes", CLASS, "--rep-ms", "5",
                     "--backend", "sdpa"]) == 0
    table = cost_tables.read_table(path)
    assert table.classes[CLASS]["reference"] == 123.0
    assert 0 < table.classes[CLASS]["sdpa"] < 1e6
    assert table.extra["measured_backends"]["reference"] == "2000-01-01"
    assert table.extra["measured_backends"]["sdpa"] != "2000-01-01"
    assert table.extra["versions"]["flash-attn-4"] == "4.0.0b36"  # fa4 was not re-measured
    assert tune.merge_costs({"a": 1.0, "b": 2.0}, {"a": 3.0}, ["a", "b"]) == {"a": 3.0}


def test_a_class_is_measured_on_the_same_call_whatever_the_run_measures(cache, monkeypatch):
    """The representative call of a class (its lengths and data) depends on the class alone:
    a run filtered to that class and a run of the whole list measure the same call, so a
    partial re-measure compares backends on one shape (it once took the class's index in
    the run's list as the seed: a long-bucket call of 3 sequences in one run was one of 6
    in the next, twice the work)."""
    built: dict[str, list[tuple]] = {}
    real_build = tune.build_call

    def recording_build(case, device, seed=None):
        kwargs = real_build(case, device, seed)
        built.setdefault(case.intended().key(), []).append(
            (kwargs["cu_seqlens_q"].tolist(), kwargs["q"].flatten()[:8].tolist()))
        return kwargs

    monkeypatch.setattr(tune, "build_call", recording_build)
    monkeypatch.setattr(tune, "measure", lambda *args, **kwargs: 1.0)
    key = "float32/d64/g2-8/causal/long/fwd"
    tune.tune("cpu", backends=["reference"], patterns=[key], output=cache / "one.json",
              progress=lambda line: None)
    tune.tune("cpu", backends=["reference"], patterns=["float32/d64/g2-8/*"],
              output=cache / "all.json", progress=lambda line: None)
    assert len(built[key]) == 2 and built[key][0] == built[key][1]
    assert len(built) > 1  # the second run built other classes before this one
    lengths = {tuple(calls[0][0]) for k, calls in built.items() if "/medium/" in k}
    assert len(lengths) == len([k for k in built if "/medium/" in k]), \
        "classes of one bucket draw their own lengths"


def test_accelerator_list_measures_tiny_calls_both_ways():
    """On an accelerator each tiny class is measured with device offsets (as flash_attn
    callers pass them) and with host lengths (a VarlenInfo): tiny and tiny-host."""
    import dataclasses

    from attnhub.varlen_info import VarlenInfo

    cases = tune.default_cases("cuda")
    tiny = {dataclasses.replace(c, length="x") for c in cases if c.length == "tiny"}
    host = {dataclasses.replace(c, length="x") for c in cases if c.length == "tiny-host"}
    assert tiny and tiny == host
    assert not any(c.length == "tiny-host" for c in tune.default_cases("cpu"))
    case = next(c for c in cases if c.length == "tiny-host")
    kwargs = tune.build_call(case, torch.device("cpu"))
    assert isinstance(kwargs["cu_seqlens_q"], VarlenInfo) and "max_seqlen_q" not in kwargs
    assert tune.problem_of(kwargs).lengths_known  # what the run classifies (no max_seqlen)
    offsets = tune.build_call(dataclasses.replace(case, length="tiny"), torch.device("cpu"))
    assert isinstance(offsets["cu_seqlens_q"], torch.Tensor) and offsets["max_seqlen_q"] == 64
