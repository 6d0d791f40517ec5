"""VarlenInfo, host copies of index tensors, and the sync-free call paths.

'meta' tensors stand in for device tensors: they have no data, so any attempt to read one back
to the host fails, which is exactly what a sync-free path must never do.
"""

from __future__ import annotations

import gc

import pytest
import torch

import attnhub
from attnhub import VarlenInfo, host_copies

NHEADS, NHEADS_K, D = 4, 2, 16


# -- VarlenInfo ----------------------------------------------------------------------------------

@pytest.mark.parametrize("build", [
    lambda: VarlenInfo.from_lengths([3, 0, 5]),
    lambda: VarlenInfo.from_lengths((3, 0, 5)),
    lambda: VarlenInfo.from_lengths(torch.tensor([3, 0, 5])),
    lambda: VarlenInfo.from_lengths(torch.tensor([3, 0, 5], dtype=torch.int32)),
    lambda: VarlenInfo.from_cu_seqlens([0, 3, 3, 8]),
    lambda: VarlenInfo.from_cu_seqlens(torch.tensor([0, 3, 3, 8], dtype=torch.int32)),
    lambda: VarlenInfo.from_cu_seqlens(torch.tensor([0, 3, 3, 8], dtype=torch.int64)),
    lambda: VarlenInfo([0, 3, 3, 8]),
], ids=["lengths-list", "lengths-tuple", "lengths-int64", "lengths-int32", "cu-list",
        "cu-int32", "cu-int64", "ctor"])
def test_fields(build):
    info = build()
    assert info.cu_seqlens_host == (0, 3, 3, 8)
    assert all(type(x) is int for x in info.cu_seqlens_host)
    assert info.seqlens == (3, 0, 5)
    assert info.max_seqlen == 5 and info.total == 8 and info.batch == 3 and len(info) == 3
    assert info.cu_seqlens.dtype == torch.int32
    assert info.cu_seqlens.tolist() == [0, 3, 3, 8]
    assert info.device == torch.device("cpu") and info.cu_seqlens.device.type == "cpu"
    assert repr(info) == "VarlenInfo(batch=3, total=8, max_seqlen=5, device=cpu)"


def test_empty_batch():
    info = VarlenInfo.from_lengths([])
    assert info.cu_seqlens_host == (0,) and info.batch == 0 and info.total == 0
    assert info.max_seqlen == 0 and info.seqlens == ()


def test_all_zero_lengths():
    info = VarlenInfo.from_lengths([0, 0])
    assert info.cu_seqlens_host == (0, 0, 0) and info.max_seqlen == 0 and info.total == 0


def test_device_argument_and_to_cache():
    info = VarlenInfo.from_lengths([2, 4], device="meta")
    assert info.device.type == "meta" and info.cu_seqlens.dtype == torch.int32
    assert info.cu_seqlens_host == (0, 2, 6)  # the host copy needs no read-back

    cpu = VarlenInfo.from_lengths([2, 4])
    assert cpu.to("cpu") is cpu and cpu.to(torch.device("cpu")) is cpu
    meta = cpu.to("meta")
    assert meta is not cpu and meta.device.type == "meta"
    assert meta.to("meta") is meta and cpu.to("meta") is meta  # built once per device
    assert meta.to("cpu") is cpu
    for field in ("cu_seqlens_host", "seqlens", "max_seqlen", "total", "batch"):
        assert getattr(meta, field) == getattr(cpu, field)


def test_from_cu_seqlens_keeps_tensor_device():
    info = VarlenInfo.from_cu_seqlens(torch.tensor([0, 1, 4]))
    assert info.device.type == "cpu"
    info = VarlenInfo.from_cu_seqlens([0, 1, 4], device="meta")
    assert info.device.type == "meta" and info.seqlens == (1, 3)


def test_info_matches_list_and_tensor_calls():
    torch.manual_seed(0)
    q = torch.randn(8, NHEADS, D)
    k = torch.randn(8, NHEADS_K, D)
    v = torch.randn(8, NHEADS_K, D)
    cu = [0, 3, 3, 8]
    info = VarlenInfo.from_cu_seqlens(cu)
    want = attnhub.attention_forward_varlen(q, k, v, cu, cu, causal=True)
    for cu_arg in (info, torch.tensor(cu, dtype=torch.int32), torch.tensor(cu)):
        got = attnhub.attention_forward_varlen(q, k, v, cu_arg, cu_arg, causal=True)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    problem, inputs = attnhub.normalize(q, k, v, info, info)
    assert problem.seqlens_q == (3, 0, 5) and problem.max_seqlen_q == 5
    assert inputs.cu_seqlens_q is info.cu_seqlens  # reused, not rebuilt per call
    problem, _ = attnhub.normalize(q, k, v, info, info, 32, 16)
    assert (problem.max_seqlen_q, problem.max_seqlen_k) == (32, 16)  # an upper bound is fine


# -- sync freedom --------------------------------------------------------------------------------

@pytest.fixture
def no_reads(monkeypatch):
    """Any host read of a tensor fails the test."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a tensor was read back to the host")

    monkeypatch.setattr(host_copies, "host_copy", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)


def _meta_qkv(total_q=8, total_k=8):
    return (torch.empty(total_q, NHEADS, D, device="meta"),
            torch.empty(total_k, NHEADS_K, D, device="meta"),
            torch.empty(total_k, NHEADS_K, D, device="meta"))


def test_varlen_info_call_reads_nothing(no_reads):
    info = VarlenInfo.from_lengths([3, 0, 5])  # built (on the host) before the reads are banned
    q, k, v = _meta_qkv()
    problem, inputs = attnhub.normalize(q, k, v, info, info)
    assert problem.seqlens_q == (3, 0, 5) and problem.seqlens_k == (3, 0, 5)
    assert problem.max_seqlen_q == 5 and problem.total_k == 8
    assert inputs.cu_seqlens_q.device.type == "meta"
    assert inputs.cu_seqlens_q is info.to("meta").cu_seqlens
    # Errors are still found, from the host copy.
    with pytest.raises(attnhub.InvalidArgumentError, match="max_seqlen_q"):
        attnhub.normalize(q, k, v, info, info, 4, 5)
    q7, _, _ = _meta_qkv(total_q=7)
    with pytest.raises(attnhub.InvalidArgumentError, match="cu_seqlens_q"):
        attnhub.normalize(q7, k, v, info, info)
    expl = attnhub.explain(q, k, v, info, info)
    assert expl.selected is None  # nothing computes on meta, but explaining is free


def test_device_tensor_with_max_seqlen_reads_nothing(no_reads):
    q, k, v = _meta_qkv()
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device="meta")
    problem, inputs = attnhub.normalize(q, k, v, cu, cu, 5, 5)
    assert problem.seqlens_q is None and problem.seqlens_k is None  # unknown, not read
    assert problem.max_seqlen_q == 5 and problem.batch == 3
    assert inputs.cu_seqlens_q is cu
    cu64 = torch.tensor([0, 3, 3, 8], device="meta")  # int64: converted on the device
    _, inputs = attnhub.normalize(q, k, v, cu64, cu64, 5, 5)
    assert inputs.cu_seqlens_q.dtype == torch.int32 and inputs.cu_seqlens_q.device.type == "meta"


def test_device_tensor_without_max_seqlen_is_read_once(monkeypatch):
    reads = []

    def fake_copy(t):
        reads.append(t)
        return (0, 3, 3, 8)

    monkeypatch.setattr(host_copies, "host_copy", fake_copy)
    q, k, v = _meta_qkv()
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32, device="meta")
    problem, _ = attnhub.normalize(q, k, v, cu, cu, None, 5)
    assert reads == [cu]  # the q side needs its max: one read; the k side had max_seqlen_k
    assert problem.max_seqlen_q == 5 and problem.seqlens_q == (3, 0, 5)


@pytest.mark.parametrize(("mode", "expected_reads"), [("auto", 0), ("full", 2)])
def test_validate_mode_decides_device_reads(monkeypatch, mode, expected_reads):
    """ATTNHUB_VALIDATE=full reads device offsets back (once per tensor) to validate them even
    when max_seqlen was given; auto does not."""
    reads = []

    def fake_copy(t):
        reads.append(t)
        return (0, 3, 3, 9)  # bad: the last offset is not total_q

    monkeypatch.setattr(host_copies, "host_copy", fake_copy)
    monkeypatch.setenv("ATTNHUB_VALIDATE", mode)
    q, k, v = _meta_qkv()
    cu_q = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device="meta")
    cu_k = torch.tensor([0, 3, 3, 9], dtype=torch.int32, device="meta")
    if mode == "full":
        with pytest.raises(attnhub.InvalidArgumentError) as exc_info:
            attnhub.normalize(q, k, v, cu_q, cu_k, 5, 5)
        assert exc_info.value.argument == "cu_seqlens_q"
        assert reads == [cu_q]
        monkeypatch.setattr(host_copies, "host_copy", lambda t: reads.append(t) or (0, 3, 3, 8))
        problem, _ = attnhub.normalize(q, k, v, cu_q, cu_k, 5, 5)
        assert reads[1:] == [cu_q, cu_k] and problem.seqlens_q == (3, 0, 5)
    else:
        problem, _ = attnhub.normalize(q, k, v, cu_q, cu_k, 5, 5)
        assert reads == [] and problem.seqlens_q is None


@pytest.mark.parametrize(("mode", "reads_table"), [("auto", False), ("full", True)])
def test_validate_mode_decides_block_table_reads(monkeypatch, mode, reads_table):
    reads = []
    table = torch.tensor([[5, 0], [1, 2], [3, 4]], dtype=torch.int32, device="meta")

    def fake_copy(t):
        reads.append(t)
        return ((5, 0), (1, 2), (3, 4)) if t is table else (0, 3, 3, 8)

    monkeypatch.setattr(host_copies, "host_copy", fake_copy)
    monkeypatch.setenv("ATTNHUB_VALIDATE", mode)
    q = torch.empty(8, NHEADS, D, device="meta")
    pool = torch.empty(6, 4, NHEADS_K, D, device="meta")
    cu_q = VarlenInfo.from_lengths([3, 0, 5]).to("meta")
    cu_k = VarlenInfo.from_lengths([7, 0, 5]).to("meta")
    problem, inputs = attnhub.normalize(q, pool, pool, cu_q, cu_k, block_table=table)
    assert any(r is table for r in reads) is reads_table
    assert problem.paged == attnhub.PagedLayout(num_pages=6, page_size=4, max_pages=2)
    assert problem.total_k == 12 and inputs.block_table is table


def test_cached_host_copy_is_used_with_max_seqlen():
    """A device tensor read once (by an earlier call without max_seqlen) gives its values for
    free to later calls with max_seqlen, so errors are still detected under the default
    ATTNHUB_VALIDATE=auto, with no new read."""
    q, k, v = _meta_qkv()
    cu = _FakeDeviceTensor.of([0, 3, 3, 8])
    attnhub.normalize(q, k, v, cu, cu)
    assert _FakeDeviceTensor.reads == 1
    problem, _ = attnhub.normalize(q, k, v, cu, cu, 5, 6)
    assert problem.seqlens_q == (3, 0, 5) and problem.max_seqlen_k == 6
    with pytest.raises(attnhub.InvalidArgumentError) as exc_info:
        attnhub.normalize(q, k, v, cu, cu, 4, 5)
    assert exc_info.value.argument == "max_seqlen_q"
    assert _FakeDeviceTensor.reads == 1
    fresh = _FakeDeviceTensor.of([0, 3, 3, 8])  # never read: nothing known, nothing read
    problem, _ = attnhub.normalize(q, k, v, fresh, fresh, 4, 5)
    assert problem.seqlens_q is None and _FakeDeviceTensor.reads == 0


# -- host copies cache ---------------------------------------------------------------------------

class _FakeDeviceTensor(torch.Tensor):
    """A CPU tensor that says it lives on another device and counts its read-backs."""

    reads = 0

    @property
    def device(self):
        return torch.device("meta")

    def tolist(self):
        type(self).reads += 1
        return super().tolist()

    @classmethod
    def of(cls, values):
        cls.reads = 0
        return torch.tensor(values, dtype=torch.int32).as_subclass(cls)


def test_host_copy_reads_a_device_tensor_once():
    t = _FakeDeviceTensor.of([0, 3, 8])
    assert host_copies.cached(t) is None
    assert host_copies.host_copy(t) == (0, 3, 8)
    assert host_copies.host_copy(t) == (0, 3, 8)
    assert host_copies.host_copy(t) == (0, 3, 8)
    assert _FakeDeviceTensor.reads == 1
    assert host_copies.cached(t) == (0, 3, 8)


def test_host_copy_nested_tuples():
    t = _FakeDeviceTensor.of([[1, 2], [3, 4]])
    assert host_copies.host_copy(t) == ((1, 2), (3, 4))
    assert host_copies.host_copy(torch.tensor([[1], [2]])) == ((1,), (2,))


def test_in_place_modification_invalidates_the_host_copy():
    t = _FakeDeviceTensor.of([0, 3, 8])
    assert host_copies.host_copy(t) == (0, 3, 8)
    t[1] = 5  # bumps t._version
    assert host_copies.cached(t) is None
    assert host_copies.host_copy(t) == (0, 5, 8)
    assert _FakeDeviceTensor.reads == 2
    t.add_(1)
    assert host_copies.host_copy(t) == (1, 6, 9)
    assert host_copies.host_copy(t) == (1, 6, 9)
    assert _FakeDeviceTensor.reads == 3


def test_distinct_tensors_with_equal_values_are_read_separately():
    a, b = _FakeDeviceTensor.of([0, 2]), torch.tensor([0, 2], dtype=torch.int32)
    b = b.as_subclass(_FakeDeviceTensor)
    host_copies.host_copy(a)
    host_copies.host_copy(b)
    assert _FakeDeviceTensor.reads == 2


def test_host_copy_entry_dies_with_its_tensor():
    t = _FakeDeviceTensor.of([0, 4])
    host_copies.host_copy(t)
    key = id(t)
    assert key in host_copies._cache
    del t
    gc.collect()
    assert key not in host_copies._cache


def test_cpu_tensors_are_not_cached():
    t = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert host_copies.host_copy(t) == (0, 3, 8)
    assert id(t) not in host_copies._cache
    t[1] = 4
    assert host_copies.host_copy(t) == (0, 4, 8)


def test_normalize_reuses_the_host_copy_across_calls(monkeypatch):
    """One read per cu_seqlens tensor across several calls (one call per layer)."""
    q, k, v = _meta_qkv()
    cu = _FakeDeviceTensor.of([0, 3, 3, 8])
    problems = [attnhub.normalize(q, k, v, cu, cu)[0] for _ in range(4)]
    assert _FakeDeviceTensor.reads == 1
    assert all(p.seqlens_q == (3, 0, 5) and p.max_seqlen_q == 5 for p in problems)
    cu[2] = 4  # modified in place: read again, and validated again
    problems = [attnhub.normalize(q, k, v, cu, cu)[0] for _ in range(2)]
    assert _FakeDeviceTensor.reads == 2 and problems[0].seqlens_q == (3, 1, 4)
