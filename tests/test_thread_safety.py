"""Calls from several threads at once: the plan cache under eviction, and the Triton
interpreter (not thread-safe itself: attnhub serializes its launches)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import attnhub
from attnhub import plans


def test_plan_cache_survives_concurrent_eviction(monkeypatch):
    """Fresh VarlenInfos per call fill the cache past MAX_PLANS from 8 threads; every call
    returns the right result and nothing raises (KeyError / dict size errors before)."""
    monkeypatch.setattr(plans, "MAX_PLANS", 4)
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(6, 2, 8, generator=gen) for _ in range(3))
    want = attnhub.attention_forward_varlen(q, k, v, [0, 2, 6], [0, 2, 6], backend="reference")
    errors: list[BaseException] = []

    def worker():
        try:
            for _ in range(150):
                info = attnhub.VarlenInfo.from_lengths([2, 4])
                out = attnhub.attention_forward_varlen(q, k, v, info, info)
                torch.testing.assert_close(out, want)
        except BaseException as exc:
            errors.append(exc)

    try:
        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(old)
    assert not errors, errors[:3]
    assert len(plans._plans) <= plans.MAX_PLANS


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs on CPU tensors")
def test_triton_interpreter_calls_from_two_threads():
    """Two threads in Triton's interpreter aborted the process (heap corruption); run in a
    child process so a regression fails this test instead of the whole run."""
    code = textwrap.dedent("""
        import os, threading
        os.environ["TRITON_INTERPRET"] = "1"
        import torch, attnhub
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(40, 2, 16, generator=gen) for _ in range(3))
        cu = [0, 17, 40]
        want = attnhub.attention_forward_varlen(q, k, v, cu, cu, causal=True,
                                                backend="reference")
        errors = []
        def worker():
            try:
                for _ in range(6):
                    out = attnhub.attention_forward_varlen(q, k, v, cu, cu, causal=True,
                                                           backend="triton")
                    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
            except BaseException as exc:
                errors.append(repr(exc))
        threads = [threading.Thread(target=worker) for _ in range(2)]
        for t in threads: t.start()
        for t in threads: t.join()
        assert not errors, errors
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
