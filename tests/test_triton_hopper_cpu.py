"""The Gluon Hopper kernels stay out of calls they cannot serve: the modules import with any
Triton, and CPU tensors (or a Triton without Gluon) take the tl kernels."""

import dataclasses
from types import SimpleNamespace

import pytest
import torch

import attnhub
from attnhub.backends.triton import (
    hopper_backward,
    hopper_dkdv_wide,
    hopper_dq,
    hopper_forward,
    tiles,
)
from attnhub.normalize import normalize


def test_cpu_calls_never_reach_the_gluon_kernels():
    lengths = [5, 0, 9]
    q = torch.randn(14, 4, 64, dtype=torch.float16)
    k = v = torch.randn(14, 2, 64, dtype=torch.float16)
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    problem, _ = normalize(q, k, v, info, info, causal=True)
    assert not hopper_forward.supports(problem, q, k, v, True)
    assert not hopper_backward.supports(problem, q, k, v, q, True)
    assert not hopper_dq.supports(problem, q, k, v, q, True)


def test_forward_hands_softcap_alibi_and_head_dim_256_calls_to_the_gluon_kernel(monkeypatch):
    """forward.forward's dispatch, with the Gluon launcher replaced by a recorder (Gluon
    cannot run here): softcap and ALiBi calls count as the Gluon kernel's features, dropout
    does not; at head dim 256 the tiles are planned with Gluon's 128 rows; the score
    scalars and slopes reach the launcher."""
    from attnhub.backends.triton import forward

    asked, launched = [], []
    monkeypatch.setattr(hopper_forward, "supports",
                        lambda problem, q, k, v, plain: asked.append(plain) or plain)

    def recorder(problem, q, k, v, out, lse, cu_q, cu_k, tiles, scalars, sinks=None,
                 alibi=None, *, record=False):
        launched.append((tiles, scalars, alibi))
        return None

    monkeypatch.setattr(hopper_forward, "forward", recorder)
    lengths = [5, 0, 300]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    q = torch.randn(305, 4, 256, dtype=torch.float16)
    k = v = torch.randn(305, 2, 256, dtype=torch.float16)
    slopes = torch.rand(4)
    for kw in ({"softcap": 5.0, "causal": True}, {"alibi_slopes": slopes}):
        problem, inputs = normalize(q, k, v, info, info, **kw)
        forward.forward(problem, inputs, None)
        assert asked.pop() is True
        (programs, tile_seq, tile_blk, device_tiles), scalars, alibi = launched.pop()
        assert (programs, device_tiles) == (1 + 3, False)  # cdiv(5, 128) + cdiv(300, 128)
        tiles = sorted(zip(tile_seq.tolist(), tile_blk.tolist(), strict=True))
        assert tiles == [(0, 0), (2, 0), (2, 1), (2, 2)]
        assert scalars == forward.score_scalars(problem)
        assert alibi is inputs.alibi_slopes
    one = attnhub.VarlenInfo.from_lengths([5], "cpu")
    problem, inputs = normalize(q[:5], k[:5], v[:5], one, one, dropout_p=0.5)
    forward.forward(problem, inputs, torch.zeros(2, dtype=torch.int64))  # the tl kernel
    assert asked == [False] and not launched  # dropout: not one of Gluon's features


def test_calls_measured_faster_on_the_tl_forward_take_it(monkeypatch):
    """hopper_forward.tl_is_faster: at width 128 (head dims 72-128) a call whose query
    sequences are all at most 256 long runs the tl forward (measured faster there); one
    longer sequence, or another width, takes the Gluon kernel. So does softcap with device
    offsets only, at width 128."""
    from attnhub.backends.triton import forward

    launched = []
    monkeypatch.setattr(hopper_forward, "supports", lambda problem, q, k, v, plain: plain)
    monkeypatch.setattr(hopper_forward, "forward",
                        lambda problem, *args, **kwargs: launched.append(problem))
    for head_dim, lengths, gluon in ((128, [256, 3], False), (96, [200], False),
                                     (128, [257, 3], True), (64, [20, 3], True),
                                     (256, [20], True)):
        info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
        n = sum(lengths)
        q = torch.randn(n, 4, head_dim, dtype=torch.float16)
        k = v = torch.randn(n, 2, head_dim, dtype=torch.float16)
        problem, inputs = normalize(q, k, v, info, info, causal=True)
        assert hopper_forward.tl_is_faster(problem) is not gluon
        if gluon:
            forward.forward(problem, inputs, None)
            assert launched.pop() is problem
    assert not launched
    q = torch.randn(700, 4, 128, dtype=torch.float16)
    k = v = torch.randn(700, 2, 128, dtype=torch.float16)
    host = attnhub.VarlenInfo.from_lengths([300, 400], "cpu")
    # softcap with device offsets only (CPU offsets are host lengths: dropped here, as a
    # CUDA tensor's would be): the tl forward; without softcap, or with host lengths, Gluon
    for softcap, device_offsets, tl in ((30.0, True, True), (0.0, True, False),
                                        (30.0, False, False)):
        problem, _ = normalize(q, k, v, host, host, softcap=softcap)
        if device_offsets:
            problem = dataclasses.replace(problem, seqlens_q=None, seqlens_k=None)
        assert hopper_forward.tl_is_faster(problem) is tl


@pytest.mark.parametrize("features", [False, True])
def test_gluon_launches_are_recorded_and_replayed_with_the_calls_tensors(features, monkeypatch):
    """forward.forward's replay of the Gluon launch, with the launcher replaced by a recorder
    that hands back a fake record: a softcap call (host lengths) and a device-offset call are
    recorded at their problem's second call and replayed from the third with that call's
    q / k / v (the bases of the record's descriptors), out, lse and offsets. ALiBi and sinks
    calls: with replay.FEATURES the same, their slopes and sinks after the offsets; without,
    never recorded."""
    from attnhub.backends.triton import forward, replay

    replayed, flags = [], []

    def fake(*tensors):  # the LaunchRecord: what a replay launches with
        replayed.append(tensors)
        return True

    def launcher(problem, q, k, v, out, lse, cu_q, cu_k, tiles, scalars, sinks=None,
                 alibi=None, *, record=False):
        flags.append(record)
        return fake if record else None

    monkeypatch.setattr(replay, "FEATURES", features)
    monkeypatch.setattr(hopper_forward, "supports", lambda problem, q, k, v, plain: plain)
    monkeypatch.setattr(hopper_forward, "forward", launcher)
    forward._replays.clear()
    lengths = [5, 0, 30]
    host = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    cu = torch.tensor([0, 5, 5, 35], dtype=torch.int32)
    for offsets, kw, with_sinks in (((host, host), {"softcap": 5.0, "causal": True}, False),
                                    ((cu, cu, 30, 30), {"causal": True}, False),
                                    ((host, host), {"alibi_slopes": None}, False),
                                    ((host, host), {"causal": True}, True)):
        problem = None
        for _ in range(4):
            q = torch.randn(35, 4, 64, dtype=torch.float16)
            k = v = torch.randn(35, 2, 64, dtype=torch.float16)
            call = dict(kw)
            if "alibi_slopes" in call:
                call["alibi_slopes"] = torch.rand(4)  # new slopes every call
            sinks = torch.rand(4) if with_sinks else None
            p, inputs = normalize(q, k, v, *offsets, **call, sinks=sinks)
            problem = p if problem is None else problem
            out, lse = forward.forward(problem, inputs, None, sinks=sinks)
        extra = (inputs.alibi_slopes,) if "alibi_slopes" in kw else (sinks,) if with_sinks \
            else ()
        if extra and not features:
            assert flags == [False] * 4 and not replayed
            flags.clear()
            continue
        assert flags == [False, True]  # the third and fourth calls replay
        assert len(replayed) == 2
        *call_tensors, = replayed[-1]
        assert len(call_tensors) == 7 + len(extra)
        r_q, r_k, r_v, r_out, r_lse, r_cu_q, r_cu_k = call_tensors[:7]
        assert r_q is inputs.q and r_k is inputs.k and r_v is inputs.v
        assert r_out is out and r_lse is lse
        assert r_cu_q is inputs.cu_seqlens_q and r_cu_k is inputs.cu_seqlens_k
        assert all(a is b for a, b in zip(call_tensors[7:], extra, strict=True))
        flags.clear()
        replayed.clear()
    forward._replays.clear()


def test_replayed_argument_names_are_the_gluon_kernels_parameters():
    """A replay puts the call's tensors into the parameters REPLAY_ARGS names (a name the
    kernel lacks would silently disable replay); the kernel's other tensor parameters are
    fixed per problem: the host tile list, or placeholders, except the sinks and ALiBi
    slopes of calls that have them (replayed by name with replay.FEATURES)."""
    if not hopper_forward.available():
        pytest.skip("this Triton has no Gluon")
    names = hopper_forward._hopper_fwd_kernel.arg_names
    assert set(hopper_forward.REPLAY_ARGS + hopper_forward.SECOND_CHUNK_ARGS) == set(names[:10])
    assert names[10:14] == ["TileSeq", "TileBlk", "Sinks", "Alibi"]
    # both dK/dV kernels (hopper_backward.dkdv's) and the dQ: every tensor parameter before
    # the tile list is replayed
    wide = hopper_dkdv_wide._hopper_dkdv_wide_kernel
    for kernel, module, n in ((wide, hopper_backward, 14),
                              (hopper_backward._hopper_dkdv_kernel, hopper_backward, 14),
                              (hopper_dq._hopper_dq_kernel, hopper_dq, 13)):
        assert set(kernel.arg_names[:n]) == set(module.REPLAY_TWO_CHUNK_ARGS)
        assert module.REPLAY_TWO_CHUNK_ARGS[:len(module.REPLAY_ARGS)] == module.REPLAY_ARGS
        assert kernel.arg_names[n:n + 2] == ["TileSeq", "TileBlk"]


def test_split_head_dims_are_two_power_of_two_chunks():
    """hopper_forward.split_widths: head dims that are the sum of two powers of two (the
    first 64 or more, the second 16 or more) are read as two column chunks; the others, the
    native widths, and every head dim for a kernel whose CONFIG["split"] is off, are not."""
    got = {d: hopper_forward.split_widths(d) for d in range(8, 257, 8)}
    assert {d: w for d, w in got.items() if w is not None} == {
        80: (64, 16), 96: (64, 32), 144: (128, 16), 160: (128, 32), 192: (128, 64)}
    assert hopper_forward.split_widths(192, allowed=False) is None
    for module in (hopper_forward, hopper_backward, hopper_dq):
        assert module.CONFIG["split"] is True


def test_wide_dkdv_second_chunk_widths():
    """hopper_dkdv_wide reads the head dims above 128 as 128 columns and a second chunk:
    split_widths' power of two where there is one (warpgroup 1's share of dK and dV shrinks
    with it), 128 zero-filled columns otherwise or with the split off."""
    got = {d: hopper_dkdv_wide.second_width(d, True) for d in range(136, 257, 8)}
    assert {d: w for d, w in got.items() if w != 128} == {144: 16, 160: 32, 192: 64}
    assert {hopper_dkdv_wide.second_width(d, False) for d in range(136, 257, 8)} == {128}
    # every second width has its (query block, stages) in the launch table
    assert set(got.values()) <= set(hopper_backward.CONFIG["wide"])


def test_head_dims_the_gluon_forward_reads_padded():
    """Head dims 64 / 128 / 256 as they are; other multiples of 8 between 64 and 256 read
    zero-padded to the next of them (16-byte rows for TMA); the rest go to the tl kernel."""
    widths = {d: hopper_forward.block_d(d) for d in (32, 64, 72, 96, 100, 128, 136, 192,
                                                      248, 256, 264)}
    assert widths == {32: None, 64: 64, 72: 128, 96: 128, 100: None, 128: 128, 136: 256,
                      192: 256, 248: 256, 256: 256, 264: None}


@pytest.mark.parametrize("head_dim", [64, 96, 128, 192, 256])
def test_gluon_backward_takes_device_offsets_at_the_widths_of_its_config(head_dim,
                                                                         monkeypatch):
    """Without host lengths (flash_attn's cu_seqlens tensors), the Gluon dK/dV and dQ serve
    the widths of CONFIG["device_offsets"] only (width 64: the tl backward); with host
    lengths, every width they read. The GPU and TMA checks are replaced (CPU tensors)."""
    monkeypatch.setattr(hopper_forward, "supports", lambda problem, q, k, v, plain: plain)
    lengths = [5, 0, 9]
    q = torch.randn(14, 4, head_dim, dtype=torch.float16)
    k = v = torch.randn(14, 2, head_dim, dtype=torch.float16)
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    host, _ = normalize(q, k, v, info, info, causal=True)
    # CPU offsets count as host lengths: the problem a CUDA call without them would make
    device = dataclasses.replace(host, seqlens_q=None, seqlens_k=None)
    assert host.lengths_known and not device.lengths_known
    width = hopper_forward.block_d(head_dim)
    for kernel in (hopper_backward, hopper_dq):
        assert kernel.supports(host, q, k, v, q, True)
        assert kernel.supports(device, q, k, v, q, True) == (
            width in kernel.CONFIG["device_offsets"])
    assert hopper_backward.supports(device, q, k, v, q, True) == (head_dim != 64)


def test_device_offsets_served_above_a_longest_sequence(monkeypatch):
    """CONFIG["device_offsets_above"] {64: N}: at width 64 the Gluon dK/dV and dQ take calls
    without host lengths whose longest sequence (max_seqlen, queries or keys) exceeds N, and
    leave the others to the tl backward; host lengths are served whatever the lengths."""
    monkeypatch.setattr(hopper_forward, "supports", lambda problem, q, k, v, plain: plain)
    q = torch.randn(300, 4, 64, dtype=torch.float16)
    k = v = torch.randn(300, 2, 64, dtype=torch.float16)
    for kernel in (hopper_backward, hopper_dq):
        monkeypatch.setitem(kernel.CONFIG, "device_offsets_above", {64: 256})
    for lengths, served in (([200, 100], False), ([40, 260], True), ([256, 44], False)):
        info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
        host, _ = normalize(q, k, v, info, info, causal=True)
        device = dataclasses.replace(host, seqlens_q=None, seqlens_k=None)
        for kernel in (hopper_backward, hopper_dq):
            assert kernel.supports(host, q, k, v, q, True)
            assert kernel.supports(device, q, k, v, q, True) is served, (kernel, lengths)
    for kernel in (hopper_backward, hopper_dq):
        monkeypatch.setitem(kernel.CONFIG, "device_offsets_above", {})
        assert not kernel.supports(device, q, k, v, q, True)


def test_dkdv_key_rows_per_program(monkeypatch):
    """hopper_backward.block_n: 128 key rows (two consumer warpgroups) at widths 64 and 128,
    64 at width 256 (the wide kernel); CONFIG["block_n"] 192 (three warpgroups) applies to
    head dims read as one chunk, not to two-chunk ones (96 = 64 + 32 keeps two)."""
    assert {d: hopper_backward.block_n(d) for d in (64, 96, 112, 128, 192, 256)} == {
        64: 128, 96: 128, 112: 128, 128: 128, 192: 64, 256: 64}
    monkeypatch.setitem(hopper_backward.CONFIG, "block_n", {64: 192, 128: 192})
    assert {d: hopper_backward.block_n(d) for d in (64, 80, 96, 112, 128)} == {
        64: 192, 80: 128, 96: 128, 112: 192, 128: 192}


def test_dkdv_query_blocks(monkeypatch):
    """The narrow Gluon dK/dV's query block: CONFIG["block_m"] at the width of head dims read
    as one chunk (64 -> 64 rows; 112 and 128 -> 32 at width 128); for the two-chunk ones (80 =
    64 + 16, 96 = 64 + 32) CONFIG["split_block_m"], and CONFIG["split_causal_rows"]'s 64 for
    causal calls longer than 256 tokens or of unknown length; the width's when padded."""
    assert {d: hopper_backward.query_block(d) for d in (64, 80, 96, 112, 128)} == {
        64: 64, 80: 32, 96: 32, 112: 32, 128: 32}
    assert {d: hopper_backward.query_block(d, True, 1000) for d in (64, 80, 96, 128)} == {
        64: 64, 80: 64, 96: 64, 128: 32}
    assert hopper_backward.query_block(96, True, 256) == 32
    assert hopper_backward.query_block(96, True, 257) == 64
    assert hopper_backward.query_block(96, True, 0) == 64  # longest sequence not known
    assert hopper_backward.query_block(96, False, 1000) == 32
    monkeypatch.setitem(hopper_backward.CONFIG, "split", False)
    assert hopper_backward.query_block(96, True, 1000) == 32


@pytest.mark.parametrize("kernel", [hopper_forward, hopper_dq])
def test_query_rows_per_program(kernel, monkeypatch):
    """block_m of the Gluon forward and dQ: 192 query rows (three consumer warpgroups) at
    head dim 64, 128 (two) at the others; CONFIG["block_m"] 192 applies to head dims read as
    one chunk, not to two-chunk ones (96 = 64 + 32 keeps two)."""
    assert {d: kernel.block_m(d) for d in (64, 96, 112, 128, 192, 256)} == {
        64: 192, 96: 128, 112: 128, 128: 128, 192: 128, 256: 128}
    monkeypatch.setitem(kernel.CONFIG, "block_m", {64: 192, 128: 192, 256: 128})
    assert {d: kernel.block_m(d) for d in (64, 80, 96, 112, 128, 192, 256)} == {
        64: 192, 80: 128, 96: 128, 112: 192, 128: 192, 192: 128, 256: 128}


def test_forward_rows_of_causal_short_calls(monkeypatch):
    """hopper_forward.CONFIG["causal_short_rows"] {64: (256, 128)}: a causal head-dim-64
    call whose longest query sequence is known and at most 256 takes 128-row tiles (the
    three-warpgroup tile's masked triangle costs more there), every other call 192."""
    assert hopper_forward.block_m(64, True, 256) == 128
    assert hopper_forward.block_m(64, True, 1) == 128
    assert hopper_forward.block_m(64, True, 257) == 192
    assert hopper_forward.block_m(64, True, 0) == 192  # longest sequence not known
    assert hopper_forward.block_m(64, False, 100) == 192
    assert hopper_forward.block_m(128, True, 100) == 128
    q = torch.randn(300, 4, 64, dtype=torch.float16)
    k = v = torch.randn(300, 2, 64, dtype=torch.float16)
    for lengths, causal, rows in (([200, 100], True, 128), ([40, 260], True, 192),
                                  ([200, 100], False, 192)):
        info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
        problem, _ = normalize(q, k, v, info, info, causal=causal)
        assert hopper_forward.problem_block_m(problem) == rows, (lengths, causal)
    monkeypatch.setitem(hopper_forward.CONFIG, "causal_short_rows", {})
    assert hopper_forward.block_m(64, True, 100) == 192


def test_launch_grid_puts_the_heads_that_share_kv_side_by_side():
    """tiles.launch_grid: (programs, heads) for MHA; for GQA (group, programs, K/V heads),
    where a program's head is program_id(2) * group + program_id(0), so consecutive programs
    (axis 0 fastest) are one tile's query heads of one K/V head; past CUDA's y limit of
    65535 tiles the MHA order."""
    assert tiles.launch_grid(40, 32) == (40, 32)
    assert tiles.launch_grid(40, 32, 1) == (40, 32)
    grid = tiles.launch_grid(40, 32, 4)
    assert grid == (4, 40, 8)
    order = [(tile, z * grid[0] + x) for z in range(grid[2]) for tile in range(grid[1])
             for x in range(grid[0])]  # launch order: x fastest, then y, then z
    assert sorted(order) == [(t, h) for t in range(40) for h in range(32)]
    assert order[:4] == [(0, 0), (0, 1), (0, 2), (0, 3)]  # K/V head 0's query heads
    assert {h // 4 for _, h in order[:4 * 40]} == {0}
    assert tiles.launch_grid(32, 32, 32) == (32, 32, 1)  # MQA
    assert tiles.launch_grid(65535, 32, 4) == (4, 65535, 8)
    assert tiles.launch_grid(65536, 32, 4) == (65536, 32)


def test_grouped_heads_only_for_gqa_calls_with_a_right_key_bound(monkeypatch):
    """hopper_forward.grouped_heads: the GQA group for causal and windowed calls, 1 for MHA,
    calls without a mask or with a left-only window, and with CONFIG["grouped_heads"] off."""
    def problem(window, group):
        return SimpleNamespace(window=window, group_size=group)

    assert hopper_forward.grouped_heads(problem((-1, 0), 4)) == 4  # causal
    assert hopper_forward.grouped_heads(problem((512, 0), 8)) == 8  # causal sliding window
    assert hopper_forward.grouped_heads(problem((64, 64), 4)) == 4
    assert hopper_forward.grouped_heads(problem((-1, -1), 4)) == 1  # no mask
    assert hopper_forward.grouped_heads(problem((128, -1), 4)) == 1
    assert hopper_forward.grouped_heads(problem((-1, 0), 1)) == 1
    monkeypatch.setitem(hopper_forward.CONFIG, "grouped_heads", False)
    assert hopper_forward.grouped_heads(problem((-1, 0), 4)) == 1
