"""attnhub bench: the matrix (axes, seeded draws, exact FLOP counts), a tiny CPU run end to
end (markdown, JSON, PNG), failures and declines reported per cell, merging, the CLI."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from conftest import make_backend

from attnhub.bench import command, direct, matrix
from attnhub.bench.inputs import make_inputs
from attnhub.bench.matrix import Cell, build_matrix, select_cells, visible_pairs
from attnhub.bench.report import merge_reports, render_markdown
from attnhub.bench.runner import BenchConfig, Progress, default_backends, run_matrix
from attnhub.cli import main


@pytest.mark.parametrize(("sq", "sk", "causal", "window", "pairs"), [
    (4, 4, False, None, 16),
    (4, 4, True, None, 10),            # 1 + 2 + 3 + 4
    (2, 4, True, None, 7),             # bottom-right: rows see 3 and 4 keys
    (4, 2, True, None, 3),             # rows 0, 1 see nothing; rows 2, 3 see 1 and 2
    (4, 4, True, (1, 0), 7),           # 1 + 2 + 2 + 2
    (3, 5, False, (1, 1), 8),          # offset 2: keys 1-3, 2-4, 3-4
    (5, 5, False, (-1, 1), 19),        # 2 + 3 + 4 + 5 + 5
    (0, 7, True, None, 0),
    (3, 0, False, None, 0),
])
def test_visible_pairs_by_hand(sq, sk, causal, window, pairs):
    assert visible_pairs(sq, sk, causal, window) == pairs


def test_visible_pairs_match_the_mask_definition():
    for sq, sk, causal, window in [(7, 11, True, (3, 0)), (9, 4, False, (2, 5)),
                                   (6, 6, True, None), (5, 8, False, (-1, 0))]:
        left, right = window or (-1, -1)
        if causal:
            right = 0
        i = torch.arange(sq)[:, None] + sk - sq
        j = torch.arange(sk)[None, :]
        mask = torch.ones(sq, sk, dtype=torch.bool)
        if left >= 0:
            mask &= j >= i - left
        if right >= 0:
            mask &= j <= i + right
        assert visible_pairs(sq, sk, causal, window) == int(mask.sum())


def _cell(**changes) -> Cell:
    fields = dict(name="c", axis="test", description="test", seqlens_q=(4, 2),
                  seqlens_k=(4, 4), nheads=4, nheads_k=2, head_dim=16, dtype="float32")
    return Cell(**{**fields, **changes})


def test_flops_count_visible_pairs_and_the_backward_factor():
    cell = _cell()                                   # causal: 10 + 7 pairs
    assert cell.visible_pairs() == 17
    assert cell.flops("fwd") == 4 * 16 * 4 * 17
    assert cell.flops("fwd+bwd") == 3.5 * 4 * 16 * 4 * 17
    assert _cell(causal=False).flops("fwd") == 4 * 16 * 4 * 24
    with pytest.raises(ValueError, match="mode must be one of"):
        cell.flops("bwd")


def test_gpu_matrix_covers_the_axes():
    cells = {c.name: c for c in build_matrix(matrix.GPU)}
    assert {c.head_dim for c in cells.values()} == {64, 96, 128, 192, 256}
    assert {(c.nheads, c.nheads_k) for c in cells.values()} >= {(32, 32), (32, 8), (32, 4),
                                                                 (32, 1)}
    base = cells["base"]
    assert (base.head_dim, base.nheads, base.nheads_k, base.dtype, base.causal) == (
        128, 32, 8, "bfloat16", True)
    assert base.total_q == 16384 and min(base.seqlens_q[:-1]) >= 256
    assert max(base.seqlens_q) <= 4096
    assert max(cells["short"].seqlens_q) <= 256
    assert min(cells["long"].seqlens_q[:-1]) >= 1024 and max(cells["long"].seqlens_q) <= 16384
    skewed = cells["skewed"].seqlens_q
    assert sum(n >= 4096 for n in skewed) == 2 and sum(n <= 256 for n in skewed) > 20
    assert not cells["noncausal"].causal
    prefix = cells["prefix-cache"]
    extra = [k - q for q, k in zip(prefix.seqlens_q, prefix.seqlens_k, strict=True)]
    assert min(extra) >= 0 and max(extra) <= 4096 and prefix.total_k > prefix.total_q
    assert {cells["window-small"].window, cells["window-large"].window} == {(512, 0), (4096, 0)}
    large = cells["window-large"]    # the window hides keys: fewer pairs than plain causal
    assert large.visible_pairs() < _cell(seqlens_q=large.seqlens_q,
                                         seqlens_k=large.seqlens_k).visible_pairs()
    assert cells["softcap"].softcap > 0 and cells["alibi"].alibi
    decode = cells["paged-decode"]
    assert decode.page_size and set(decode.seqlens_q) == {1} and decode.modes == ("fwd",)
    tiny = cells["tiny"]
    assert tiny.tiny and tiny.seqlens_q == (64,) * 8
    assert (tiny.nheads, tiny.nheads_k, tiny.head_dim, tiny.causal) == (32, 8, 128, True)
    short = cells["short-gqa8"]
    assert short.total_q == 16384 and max(short.seqlens_q) <= 256
    assert (short.nheads, short.nheads_k, short.head_dim, short.causal) == (32, 4, 128, True)
    assert (cells["d64-mha"].head_dim, cells["d64-mha"].nheads_k) == (64, 32)
    assert "float16" in cells


def test_length_draws_are_seeded():
    assert build_matrix(matrix.GPU, seed=0) == build_matrix(matrix.GPU, seed=0)
    assert build_matrix(matrix.GPU, seed=0)[0] != build_matrix(matrix.GPU, seed=1)[0]


def test_cpu_profile_is_cpu_sized_and_quick_is_a_subset():
    cells = build_matrix(matrix.CPU)
    assert all(c.dtype == "float32" and c.total_k <= 4096 for c in cells)
    assert [c.name for c in cells] == [c.name for c in build_matrix(matrix.GPU)
                                       if c.name != "float16"]
    quick = select_cells(cells, quick=True)
    assert {c.name for c in quick} == matrix.QUICK
    assert [c.name for c in select_cells(cells, patterns=["d*"])] == [
        "d64", "d96", "d192", "d256", "d64-mha"]
    with pytest.raises(ValueError, match="'nosuch' matches no cell"):
        select_cells(cells, patterns=["nosuch"])


@pytest.fixture
def one_thread():
    """The run tests' shapes are tiny: one intra-op thread keeps them fast on a busy machine
    (a 2-thread pool waiting on a loaded CPU costs ~100x on 33-token calls)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = [
    _cell(name="small", seqlens_q=(24, 9), seqlens_k=(24, 9)),
    _cell(name="capped", seqlens_q=(16,), seqlens_k=(20,), softcap=20.0),
    _cell(name="tiny", seqlens_q=(8,) * 2, seqlens_k=(8,) * 2, tiny=True),
]
FAST = {"warmup_ms": 0.0, "rep_ms": 0.0, "host_calls": 2, "host_rounds": 1}


def test_tiny_cpu_run_end_to_end(tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(command, "build_matrix", lambda profile, seed=0: SMALL)
    monkeypatch.setitem(command.TIMING, "cpu", FAST)
    out = tmp_path / "run"
    rc = main(["bench", "--device", "cpu", "--backends", "reference,sdpa,auto",
               "--output", str(out), "--no-progress"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "3 cells x 3 implementations" in printed
    report = json.loads((out / "bench.json").read_text())
    assert report["implementations"] == ["reference", "sdpa", "auto"]
    assert report["anchors"] == ["reference"]
    status = {(m["cell"], m["impl"], m["mode"]): m for m in report["results"]}
    assert len(status) == 3 * 3 * 2
    ok = status["small", "sdpa", "fwd+bwd"]
    assert ok["status"] == "ok" and ok["ms"] > 0 and ok["tflops"] > 0
    declined = status["capped", "sdpa", "fwd"]
    assert declined["status"] == "n/a" and "softcap" in declined["reason"]
    assert status["capped", "auto", "fwd"]["selected"] == "reference"
    assert status["tiny", "reference", "fwd"]["host_us"] > 0
    md = (out / "bench.md").read_text()
    assert "# attnhub bench:" in md and f"torch {torch.__version__}" in md
    assert "4 x head_dim per visible (query, key) pair" in md and "2.5x" in md
    forward = md.split("## Forward: ")[1]
    capped = next(line for line in forward.splitlines() if line.startswith("| `capped` |"))
    assert capped.split(" | ")[2] == "n/a"          # columns: cell, reference, sdpa, auto
    assert "1.00x" in md and "ran reference" in md
    against = md.split("## Against reference, forward (its time over each one's)")[1]
    assert against.split("\n")[2] == "| cell | sdpa | auto |"
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (out / "bench.png").exists()
    else:
        assert (out / "bench.png").read_bytes()[:4] == b"\x89PNG"
        assert "![TFLOP/s per cell and implementation](bench.png)" in md


class _Broken(make_backend("broken", 5).__class__):
    def forward(self, problem, inputs):
        raise RuntimeError("kernel exploded")


def test_a_failing_backend_is_reported_and_the_run_goes_on(install, one_thread):
    install(_Broken())
    cfg = BenchConfig(device=torch.device("cpu"), backends=["broken", "reference"],
                      auto=False, direct=False, **FAST)
    results = run_matrix(SMALL[:1], cfg, progress=False)
    by_impl = {(m.impl, m.mode): m for m in results}
    assert by_impl["broken", "fwd"].status == "error"
    assert "RuntimeError: kernel exploded" in by_impl["broken", "fwd"].reason
    assert by_impl["reference", "fwd"].status == "ok"
    assert by_impl["reference", "fwd+bwd"].status == "ok"


def test_reports_merge_and_render():
    def report(cells, date):
        meta = {"device": "cpu", "device_type": "cpu", "device_name": "x", "profile": "cpu",
                "date": date, "versions": {"torch": "t"}, "offsets": "varlen-info", "seed": 0,
                "timing": "wall", "command": "attnhub bench", "wall_s": 1.0}
        results = [{"cell": c, "impl": "reference", "mode": "fwd", "status": "ok", "ms": 2.0,
                    "host_us": None, "tflops": 1.0, "reason": "", "selected": None}
                   for c in cells]
        return {"format": 1, "meta": meta, "implementations": ["reference"],
                "anchors": ["reference"],
                "cells": [{**SMALL[0].as_dict(), "name": c, "flops": {"fwd": 2e9}}
                          for c in cells], "results": results}

    merged = merge_reports([report(["a", "b"], "d1"), report(["b", "c"], "d2")])
    assert [c["name"] for c in merged["cells"]] == ["a", "b", "c"]
    assert len(merged["results"]) == 3 and merged["meta"]["wall_s"] == 2.0
    md = render_markdown(merged)
    assert "| `c` | 1 |" in md
    assert "Merged (`attnhub bench --merge`) from 2 runs: `attnhub bench` (d1, 1 s)" in md
    other = report(["d"], "d3")
    other["meta"]["device_name"] = "y"
    with pytest.raises(ValueError, match="different device_name"):
        merge_reports([merged, other])


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--part", "3/2"], "--part: expected 1 <= K <= N"),
    (["bench", "--part", "x"], "--part: expected K/N"),
    (["bench", "--time-limit", "0"], "--time-limit: expected seconds > 0"),
    (["bench", "--merge", "/nonexistent.json"], "'/nonexistent.json' is not a file"),
    (["bench", "--offsets", "host"], "--offsets: invalid choice"),
])
def test_bench_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "message"), [
    (["bench", "--device", "cpu", "--backends", "nosuch"], "unknown backend(s) nosuch"),
    (["bench", "--device", "cpu", "--cells", "nosuch"], "'nosuch' matches no cell"),
])
def test_bench_rejected_selection(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_list_prints_the_cells(capsys):
    assert main(["bench", "--device", "cpu", "--quick", "--list"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert set(names) == matrix.QUICK


def test_plain_progress_lines_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm raises ImportError
    bar = Progress(2)
    bar.step("base fwd sdpa")
    bar.step("base fwd reference")
    bar.close()
    assert capsys.readouterr().err.splitlines() == ["[1/2] base fwd sdpa",
                                                    "[2/2] base fwd reference"]


def test_without_matplotlib_the_reports_are_written_and_the_plot_explained(
        tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setattr(command, "build_matrix", lambda profile, seed=0: SMALL[:1])
    monkeypatch.setitem(command.TIMING, "cpu", FAST)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["bench", "--device", "cpu", "--backends", "reference", "--no-direct",
                 "--output", str(tmp_path), "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]
    assert "matplotlib is not installed: no plot drawn" in capsys.readouterr().err


def _inputs(grad: bool, **changes):
    cell = _cell(seqlens_q=(6, 3), seqlens_k=(6, 5), **changes)
    return make_inputs(cell, torch.device("cpu"), requires_grad=grad)


def test_torch_flash_direct_calls_the_aten_overloads(monkeypatch):
    from attnhub.backends.cuda import torch_flash

    calls = []

    def fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, probs, **kw):
        calls.append(("fwd", cu_q.tolist(), cu_k.tolist(), max_q, max_k, causal, kw))
        return q * 1, torch.zeros(q.shape[1], q.shape[0]), "seed", "offset", None

    def fake_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, p, causal, seed,
                      offset, **kw):
        calls.append(("bwd", seed, offset, kw))
        return dout, k, v

    monkeypatch.setattr(torch_flash, "aten_forward", fake_forward)
    monkeypatch.setattr(torch_flash, "aten_backward", fake_backward)
    kernel = direct.direct_kernels_for(["torch-flash"])[0]
    assert kernel.label == "torch-flash (direct)"
    x = _inputs(True, window=(4, 0))
    kernel.build(x, True)()
    scale = 16 ** -0.5
    window = {"scale": scale, "window_size_left": 4, "window_size_right": 0}
    assert calls == [("fwd", [0, 6, 9], [0, 6, 11], 6, 6, True, window),
                     ("bwd", "seed", "offset", window)]
    assert kernel.unsupported(_cell(softcap=5.0)) == "the direct call takes no softcap"
    assert kernel.unsupported(_cell()) is None


def test_torch_varlen_attn_direct_runs_torch_autograd(monkeypatch):
    """The second torch-flash anchor: torch's public varlen_attn through autograd, the
    causal mask as window (-1, 0) or (left, 0), GQA asked for; a torch whose varlen_attn
    takes only is_causal (2.10) declines windows, one without it every cell."""
    from torch.nn.attention import varlen

    seen = {}

    def varlen_attn(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None,
                    window_size=(-1, -1), enable_gqa=False):
        seen.update(scale=scale, window_size=window_size, enable_gqa=enable_gqa, max_q=max_q,
                    cu=cu_seq_k.tolist())
        group = query.shape[1] // key.shape[1]
        return query * (key.repeat_interleave(group, 1).mean(0) + value.mean())

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn)
    kernel = next(d for d in direct.direct_kernels_for(["torch-flash"])
                  if d.label == "torch varlen_attn (direct)")
    assert direct.direct_kernels_for(["torch-flash"])[0].label == "torch-flash (direct)"
    x = _inputs(True, window=(4, 0))
    grads = kernel.build(x, True)()       # through torch's autograd
    assert [g.shape for g in grads] == [x.q.shape, x.k.shape, x.v.shape]
    assert seen == {"scale": 16 ** -0.5, "window_size": (4, 0), "enable_gqa": True,
                    "max_q": 6, "cu": [0, 6, 11]}
    kernel.build(_inputs(False), False)()
    assert seen["window_size"] == (-1, 0)
    assert kernel.unsupported(_cell(window=(4, 0))) is None
    assert kernel.unsupported(_cell(softcap=5.0)) == "the direct call takes no softcap"

    def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k,
                         is_causal=False, return_aux=None, scale=None):
        raise AssertionError("not called")

    monkeypatch.setattr(varlen, "varlen_attn", varlen_attn_2_10)
    assert "varlen_attn takes no window" in kernel.unsupported(_cell(window=(4, 0)))
    assert "varlen_attn takes no GQA" in kernel.unsupported(_cell())
    assert kernel.unsupported(_cell(nheads_k=4)) is None
    monkeypatch.delattr(varlen, "varlen_attn")
    assert "has no torch.nn.attention.varlen.varlen_attn" in kernel.unsupported(_cell())


def test_torch_flash_aten_autograd_runs_the_ops_autograd_node(monkeypatch):
    """The third torch-flash anchor: the aten forward on the leaves that require grad, its
    gradient from torch's autograd (the op's own node on a GPU; here a differentiable
    stand-in); timed forward+backward only, the forward being the explicit call's."""
    from attnhub.backends.cuda import torch_flash
    from attnhub.bench.runner import _Impl, _prepare

    seen = {}

    def fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, p, causal, probs, **kw):
        seen.update(grad=(q.requires_grad, k.requires_grad, v.requires_grad), causal=causal,
                    probs=probs, kw=kw)
        group = q.shape[1] // k.shape[1]
        out = q * (k.repeat_interleave(group, 1).mean(0) + v.mean())
        return out, None, None, None, None

    monkeypatch.setattr(torch_flash, "aten_forward", fake_forward)
    kernel = next(d for d in direct.direct_kernels_for(["torch-flash"])
                  if d.label == "torch-flash aten (autograd)")
    x = _inputs(True, window=(4, 0))
    grads = kernel.build(x, True)()
    assert [g.shape for g in grads] == [x.q.shape, x.k.shape, x.v.shape]
    assert all(g.abs().sum() > 0 for g in grads)
    assert seen == {"grad": (True, True, True), "causal": True, "probs": False,
                    "kw": {"scale": 16 ** -0.5, "window_size_left": 4,
                           "window_size_right": 0}}
    assert kernel.unsupported(_cell(softcap=5.0)) == "the direct call takes no softcap"
    impl = _Impl(kernel.label, kernel.backend, kernel.build, kernel)
    m, run = _prepare(_cell(), "fwd", impl, _inputs(False), {"torch-flash": []}, None)
    assert run is None and m.reason == "timed in fwd+bwd only"
    m, run = _prepare(_cell(), "fwd+bwd", impl, _inputs(True), {"torch-flash": []}, None)
    assert run is not None and m.reason == ""


def test_fa4_direct_passes_none_for_unbounded_window_sides(monkeypatch):
    import types

    seen = {}

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None,
                               max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                               causal=False, window_size=(None, None), softcap=0.0):
        seen.update(causal=causal, window_size=window_size, softcap=softcap,
                    max_seqlen_q=max_seqlen_q)
        return q * (k.mean() + v.mean()), None

    cute = types.ModuleType("flash_attn.cute")
    cute.flash_attn_varlen_func = flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "flash_attn.cute", cute)
    kernel = direct.direct_kernels_for(["triton", "fa4"])[0]
    assert kernel.label == "fa4 (direct)"
    x = _inputs(True, causal=False, window=(3, -1), softcap=8.0)
    grads = kernel.build(x, True)()       # through the kernel's own autograd
    assert [g.shape for g in grads] == [x.q.shape, x.k.shape, x.v.shape]
    assert seen == {"causal": False, "window_size": (3, None), "softcap": 8.0,
                    "max_seqlen_q": 6}
    assert "alibi" in kernel.unsupported(_cell(alibi=True))


def test_default_backends_leave_out_the_unavailable_and_on_accelerators_the_fallback(install):
    install(make_backend("fast", 5, device_types=("cpu", "cuda")),
            make_backend("gone", 9, device_types=("cpu", "cuda"), unavailable=["no lib"]))
    chosen, left_out = default_backends(torch.device("cpu"))
    assert chosen == ["fast", "reference"] and left_out == {"gone": "no lib"}
    chosen, left_out = default_backends(torch.device("cuda"))   # registry only, no GPU needed
    assert chosen == ["fast"] and set(left_out) == {"gone", "reference"}
    assert "the fallback" in left_out["reference"]


def test_implementations_are_timed_in_interleaved_rounds(install, one_thread, monkeypatch):
    """Each round times every implementation, the order alternating, so that drift over a
    cell (clocks, temperature) weighs on all alike; a device time is the rounds' median."""
    from attnhub.bench import runner

    install(make_backend("fast", 5), make_backend("slow", 4))
    order: list[str] = []
    calls = iter(range(100))

    def fake_time(fn, cell, cfg):
        order.append(fn.label)
        return 1.0 + next(calls)  # later rounds take longer: drift

    def build(x, backend, backward, offsets):
        def fn():
            return None
        fn.label = backend
        return fn

    monkeypatch.setattr(runner, "_time_once", fake_time)
    monkeypatch.setattr(runner, "attnhub_runner", build)
    cfg = BenchConfig(device=torch.device("cpu"), backends=["fast", "slow"], auto=False,
                      direct=False, **FAST)
    results = run_matrix(SMALL[:1], cfg, progress=False)
    fwd = [m for m in results if m.mode == "fwd"]
    assert order[:6] == ["fast", "slow", "slow", "fast", "fast", "slow"]
    assert {m.impl: m.ms for m in fwd} == {"fast": 4.0, "slow": 3.0}  # medians of 1,4,5 / 2,3,6
