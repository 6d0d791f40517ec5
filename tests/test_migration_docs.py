"""The 'after' example of every migration page runs as written."""

from __future__ import annotations

import pathlib
import re

import pytest

DOCS = pathlib.Path(__file__).resolve().parents[1] / "docs"


@pytest.mark.parametrize("page,check", [
    ("migrate-flash-attn.md", lambda ns: ns["out_padded"].shape == ns["q"].shape
     and ns["step"].shape == (2, 1, 8, 64) and ns["lse"].shape == (2, 8, 16)),
    ("migrate-paddle.md", lambda ns: ns["out"].shape == (256, 18, 16) and ns["softmax"] is None),
    ("migrate-flashattention-plus.md", lambda ns: ns["y"].shape == ns["y_padded"].shape
     == (2, 64, 256)),
])
def test_migration_example_runs(page, check, monkeypatch):
    monkeypatch.delenv("ATTNHUB_BACKEND", raising=False)
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(), flags=re.S)
    assert len(blocks) == 1, f"{page} should have exactly one python (after) example"
    namespace: dict = {}
    exec(compile(blocks[0], str(DOCS / page), "exec"), namespace)
    assert check(namespace)
