"""`pytest --attnhub-backend NAME`: the pytest11 plugin, run in fresh interpreters.

The example out-of-tree package (examples/attnhub-example-backend) is made discoverable
exactly as after `pip install`: its source folder on PYTHONPATH, and a dist-info folder whose
entry_points.txt declares it under the `attnhub` group.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
from attnhub.conformance import pytest_plugin
from attnhub.conformance.cases import quick_cases

REPO = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "attnhub-example-backend"

BROKEN_MODULE = '''
import dataclasses

import torch
from attnhub.backends.reference import kernel

import attnhub


class DropsSoftcap(attnhub.Backend):
    name = "drops-softcap"
    device_types = frozenset({"cpu"})
    capabilities = attnhub.Capabilities(dtypes=frozenset({torch.float16, torch.float32}))

    def forward(self, problem, inputs):
        return kernel.forward(dataclasses.replace(problem, softcap=0.0), inputs)

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        return kernel.backward(dataclasses.replace(problem, softcap=0.0), inputs, dout, dlse)


@attnhub.hookimpl
def attnhub_register_backends(register):
    register(DropsSoftcap())
'''


def _fake_install(site: pathlib.Path, dist: str, entry_points: str) -> None:
    """A dist-info folder as pip leaves it: importlib.metadata finds its entry points."""
    info = site / f"{dist}-0.1.0.dist-info"
    info.mkdir(parents=True)
    name = dist.replace("_", "-")
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)


# Plugins of this environment that the runs below do not need (startup time); blocking a plugin
# that is not installed is fine.
PYTEST = ["-m", "pytest", "-p", "no:cacheprovider", "-p", "no:benchmark", "-p",
          "no:hypothesispytest"]


def _run(args: list[str], cwd: pathlib.Path, pythonpath: list[pathlib.Path] = ()
         ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ATTNHUB_", "PYTEST_"))}  # PYTEST_DISABLE_PLUGIN_AUTOLOAD too
    env["PYTHONPATH"] = os.pathsep.join(
        [*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # nothing written into examples/
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def _counts(output: str) -> dict[str, int]:
    summary = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (passed|failed|skipped|deselected"
                                                   r"|error)", summary)}


@pytest.fixture
def empty_dir(tmp_path):
    path = tmp_path / "run"  # a neutral name: -k also matches the names of parent folders
    path.mkdir()
    return path


@pytest.fixture
def example_site(tmp_path):
    site = tmp_path / "site"
    _fake_install(site, "attnhub_example_backend",
                  "[attnhub]\nexample-sdpa = attnhub_example_backend.plugin\n")
    return [site, EXAMPLE / "src"]


def _expected(words: tuple[str, ...]) -> list[str]:
    return [c.id for c in quick_cases() if all(w in c.id for w in words)]


def test_reference_from_an_empty_folder(empty_dir):
    proc = _run([*PYTEST, "--attnhub-backend", "reference", "-k", "gqa and fp32", "-q"],
                empty_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = _expected(("gqa", "fp32"))
    assert len(expected) == 4
    assert _counts(proc.stdout) == {"passed": len(expected),
                                    "deselected": len(quick_cases()) - len(expected)}


def test_example_package_one_liner(example_site):
    """From the package's folder, as its README says: its own tests (no conftest.py) plus
    every conformance case the plugin adds; -k selects among both."""
    proc = _run([*PYTEST, "--attnhub-backend", "example-sdpa", "-q", "-rs",
                 "-k", "causal and fp32 or test_example_sdpa"], EXAMPLE, example_site)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = _expected(("causal", "fp32"))
    dropout = [i for i in expected if i.startswith("dropout")]
    sinks = [i for i in expected if i.startswith("sinks")]
    assert len(expected) > 10 and len(dropout) == 1 and len(sinks) >= 1
    # Every case runs and passes but the dropout and sinks ones, which the backend declines
    # (skipped); the 3 unit tests of tests/test_example_sdpa.py pass too.
    declined = len(dropout) + len(sinks)
    assert _counts(proc.stdout) == {"passed": len(expected) - declined + 3, "skipped": declined,
                                    "deselected": len(quick_cases()) - len(expected)}
    assert "dropout (p = 0.3) is not supported" in proc.stdout
    assert "attention sinks (sinks=) are not supported" in proc.stdout
    assert not (EXAMPLE / ".pytest_cache").exists()


def test_example_package_is_listed_by_attnhub_info(empty_dir, example_site):
    info = _run(["-m", "attnhub", "info"], empty_dir, example_site)
    assert info.returncode == 0, info.stderr
    line = next(x for x in info.stdout.splitlines() if x.strip().startswith("example-sdpa"))
    assert "available" in line and "attnhub_example_backend.plugin" in line
    # The capability table: its dtypes, and "no" for what it declines.
    assert re.search(r"^\s+example-sdpa\s+bf16,fp16,fp32,fp64\s.*\bno\b", info.stdout, re.M)


def test_a_broken_backend_fails_under_pytest(tmp_path, empty_dir):
    site = tmp_path / "site"
    _fake_install(site, "drops_softcap", "[attnhub]\ndrops-softcap = drops_softcap\n")
    (site / "drops_softcap.py").write_text(BROKEN_MODULE)
    proc = _run([*PYTEST, "--attnhub-backend", "drops-softcap", "-q",
                 "-k", "softcap-uniform or gqa-4-2-fp32"], empty_dir, [site])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    softcap = _expected(("softcap-uniform",))
    assert len(softcap) == 4
    counts = _counts(proc.stdout)
    assert counts["failed"] == len(softcap) and counts["passed"] == 1  # gqa: the control
    for case_id in softcap:  # the failure text is the case's describe(): output and figures
        assert f"drops-softcap {case_id}: fail" in proc.stdout
    assert re.search(r"out: error \d\.\d{3}e[+-]\d\d > 2 x", proc.stdout)


def test_reference_through_a_surface(empty_dir):
    proc = _run([*PYTEST, "--attnhub-backend", "reference", "--attnhub-surface", "flash_attn",
                 "-k", "gqa and fp32", "-q", "-rA"], empty_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    expected = _expected(("gqa", "fp32"))
    assert _counts(proc.stdout)["passed"] == len(expected)
    assert "reference-via-flash_attn-gqa" in proc.stdout


def test_unknown_surface_is_a_usage_error():
    options = {"--attnhub-backend": ["reference"], "--attnhub-tier": "quick",
               "--attnhub-device": None, "--attnhub-surface": "nope"}

    class Config:
        def getoption(self, name):
            return options[name]

    with pytest.raises(pytest.UsageError, match=r"unknown surface 'nope'.*flash_attn"):
        pytest_plugin.pytest_collection_modifyitems(None, Config(), [])


def test_unknown_backend_is_a_usage_error():
    options = {"--attnhub-backend": ["nope"], "--attnhub-tier": "quick",
               "--attnhub-device": None, "--attnhub-surface": None}

    class Config:
        def getoption(self, name):
            return options[name]

    items: list = []
    with pytest.raises(pytest.UsageError, match=r"nope.*reference"):
        pytest_plugin.pytest_collection_modifyitems(None, Config(), items)
    assert items == []


def test_without_a_backend_the_plugin_adds_nothing(empty_dir):
    # Every pytest run where attnhub is installed loads the plugin: it must stay passive.
    # (--attnhub-tier and --attnhub-device are accepted; only --attnhub-backend adds cases.)
    proc = _run([*PYTEST, "-q", "--attnhub-tier", "full", "--attnhub-device", "cpu"],
                empty_dir)
    # pytest's exit code 5: no tests collected (the summary line varies with warnings)
    assert proc.returncode == 5, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and "attnhub-conformance" not in proc.stdout
