"""`attnhub tune` on a CUDA GPU: the reference is not measured there, every backend that can
run a class is, and selection then runs the fastest (within 3%, or one the table has no
figure for that ranks above it)."""

from __future__ import annotations

import pytest
import torch

import attnhub
from attnhub import tune
from attnhub.registry import get_registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CASES = [tune.TuneCase(torch.bfloat16, 128, "2-8", "causal", length, False)
         for length in ("tiny", "short")]


def test_tune_measures_and_selection_follows(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNHUB_CACHE_DIR", str(tmp_path))
    keys = [c.intended().key() for c in CASES]
    result = tune.tune("cuda", patterns=keys, rep_ms=20, progress=lambda line: None)
    assert result.measured == keys and result.path.parent == tmp_path
    for case, key in zip(CASES, keys, strict=True):
        costs = result.table.classes[key]
        assert "reference" not in costs and {"triton", "torch-flash"} <= set(costs), costs
        expl = attnhub.explain(**tune.build_call(case, torch.device("cuda")))
        assert key in expl.basis
        best = min(costs.values())
        chosen = expl.selected
        if chosen in costs:
            assert costs[chosen] <= 1.03 * best
        else:  # no figure: it ranks above every measured backend within 3% of the fastest
            priority = get_registry().backends[chosen].priority
            assert all(priority > get_registry().backends[b].priority
                       for b, ms in costs.items() if ms <= 1.03 * best)
