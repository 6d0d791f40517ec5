"""The documentation site: `mkdocs build --strict` passes, and every Python block of every
page runs as written (on the CPU; a block right after a `<!-- docs-test: gpu -->` line runs
only in the gpu tests). The repository states its semantics itself: nothing cites DESIGN.md."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
_BLOCK = re.compile(r"(<!-- docs-test: gpu -->\n)?```python\n(.*?)```", re.S)


def _blocks(page: pathlib.Path, gpu: bool) -> list[str]:
    return [code for marker, code in _BLOCK.findall(page.read_text()) if bool(marker) == gpu]


def _pages(gpu: bool) -> list[pathlib.Path]:
    return [p for p in sorted(DOCS.rglob("*.md")) if _blocks(p, gpu)]


def _run(page: pathlib.Path, blocks: list[str]) -> None:
    namespace: dict = {"__name__": f"docs.{page.stem}"}
    for i, code in enumerate(blocks):
        exec(compile(code, f"{page.relative_to(ROOT)} (python block {i + 1})", "exec"),
             namespace)


def test_site_builds_with_warnings_as_errors(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    reference = (tmp_path / "reference" / "index.html").read_text()
    assert "attention_forward_varlen" in reference and "padding_mask" in reference
    assert (tmp_path / "img" / "triton-vs-fa2.png").exists()


@pytest.mark.parametrize("page", _pages(gpu=False), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_code_blocks_run(page, capsys):
    _run(page, _blocks(page, gpu=False))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("page", _pages(gpu=True), ids=lambda p: str(p.relative_to(DOCS)))
def test_page_gpu_code_blocks_run(page):
    _run(page, _blocks(page, gpu=True))


def test_nothing_cites_design_md():
    skip = {".git", ".venv", "site", "build", "dist", "node_modules", "__pycache__"}
    citing = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in skip and not d.endswith(".egg-info")]
        for name in files:
            path = pathlib.Path(folder, name)
            if (path.suffix in {".py", ".md", ".toml", ".yml", ".sh", ".txt"}
                    and path != pathlib.Path(__file__)
                    and "DESIGN.md" in path.read_text(errors="replace")):
                citing.append(str(path.relative_to(ROOT)))
    assert not citing, f"these files cite DESIGN.md, which is not in the repository: {citing}"
