"""Sweep the Triton kernels' launch configs and the dK/dV group split on cells of the bench
matrix (attnhub/bench/matrix.py), against torch's FA2 in the same run: how configs.DEFAULTS,
configs.forward_block_m / backward_tiles and group_split's threshold were chosen.

Each trial is a '+'-joined list of overrides (an empty trial: the shipped settings):

* ``fwd:BM:BN:W:S``   forward: BLOCK_M query rows, BLOCK_N keys, W warps, S stages
* ``dkdv:BN:BM:W:S``  dK/dV: BLOCK_N key rows per program, BLOCK_M query block, warps, stages
* ``dq:BM:BN:W:S``    dQ: BLOCK_M query rows per program, BLOCK_N key block, warps, stages
* ``split:N``         the dK/dV group split (group_split.split_for)
* ``tl``              the tl kernels only (no Gluon forward, dK/dV or dQ)
* ``tldq``            the tl dQ kernel (with the Gluon dK/dV where it serves)
* ``tldkdv``          the tl dK/dV kernel (with the Gluon dQ where it serves);
  ``tldkdv+tldq``: the tl backward after the Gluon forward
* ``gdq:BN:S``        the Gluon dQ kernel: BN keys per block, S stages
* ``gdev``            the Gluon dK/dV and dQ serve device offsets at every width (shipped:
  CONFIG["device_offsets"]); with ``--offsets tensors``; ``gdev:N``: at width 64 only on
  calls whose longest sequence exceeds N tokens (CONFIG["device_offsets_above"])
* ``gdkdv:BM:S``      the Gluon dK/dV at the cell's width (64 or 128): BM query rows per
  block, S stages
* ``gfwdm:BM``        the Gluon forward at the cell's width: BM query rows per program, 64 per
  consumer warpgroup (192: three, as FA3 tiles head dim 64)
* ``gdqm:BM``         the Gluon dQ at the cell's width: BM query rows per program (192:
  three consumer warpgroups)
* ``gdkdvn:BN``       the Gluon dK/dV at the cell's width (64 or 128): BN key rows per
  program, 64 per consumer warpgroup (192: three; with ``gdkdv:32:3``, as 64-row query
  blocks spill then)
* ``gsplitm:BM``      the Gluon dK/dV's query block for head dims it reads in two chunks
  (80, 96), every call (CONFIG["split_block_m"], no split_causal_rows)
* ``gwide:BM:S``      the Gluon dK/dV at width 256 (hopper_dkdv_wide.py), for the cell's head
  dim's second column chunk (CONFIG["wide"]): BM query rows per block, S stages
* ``gfwd:BN:S``       the Gluon forward at the cell's width: BN keys per block, S stages
* ``gpad``            the Gluon kernels read every head dim outside 64 / 128 / 256
  zero-padded (no two-chunk reads: hopper_forward.split_widths); ``gpad:fwd``,
  ``gpad:dkdv``, ``gpad:dq``: that kernel only
* ``gprefetch``       the Gluon dK/dV loads each query block's lse and delta one block ahead
  at the cell's width (CONFIG["prefetch"]); ``gprefetch:off``: not at any width
* ``tilesfirst``      the Gluon forward launches GQA calls on a (programs, heads) grid, as
  MHA ones, instead of (group, programs, K/V heads) (CONFIG["grouped_heads"])
* ``gunbounded``      the Gluon dK/dV also takes calls with no right mask bound (no mask,
  left-only windows: CONFIG["right_unbounded"])

    python benchmarks/sweep_configs.py --cells d192,d256 --mode fwd+bwd \
        --trials "" "dkdv:32:32:4:1" "dkdv:64:32:8:1+dq:64:32:8:1"
    python benchmarks/sweep_configs.py --classes 'bfloat16/*/none/*/fwd+bwd' \
        --trials "" gunbounded --json /tmp/unbounded.json

``--classes`` times the representative calls of ``attnhub tune``'s classes whose keys match
(shell patterns; their lengths and data are the tune's, from the class key) instead of matrix
cells: each trial's triton time next to torch's FA2 through attnhub in the same run, as the
tune measures them (no error column: the GPU tests check the options' results).

Prints one line per (cell, trial): median time, TFLOP/s, the ratio to torch's FA2 (direct),
and the largest gradient (or output) error on a small batch of the cell's heads, head dim and
mask against a float64 reference, next to FA2's on the same batch (``WRONG`` when above
2x FA2's + 1e-3). Cells FA2 cannot compute (softcap, ALiBi) get no FA2 time, and the
reference backend's own error in the cell's dtype stands in for FA2's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

import torch
from triton.testing import do_bench

import attnhub
from attnhub.backends.triton import (
    backward,
    configs,
    forward,
    group_split,
    hopper_backward,
    hopper_dkdv_wide,
    hopper_dq,
    hopper_forward,
)
from attnhub.bench.direct import direct_kernels_for
from attnhub.bench.inputs import attnhub_runner, cell_slopes, make_inputs
from attnhub.bench.matrix import build_matrix, profile_for

NAMED_TRIALS = ("gpad", "gprefetch")  # trials whose arguments are words (gpad:dq, gprefetch:off)


@contextlib.contextmanager
def overrides(trial: str, head_dim: int):
    """Apply a trial's overrides to the Triton backend's modules, restore them after."""
    saved_defaults = {name: dict(table) for name, table in configs.DEFAULTS.items()}
    gluon_modules = (hopper_forward, hopper_backward, hopper_dq)
    # each CONFIG with its tables copied (trials write into them)
    saved_gluon = [{key: dict(value) if isinstance(value, dict) else value
                    for key, value in module.CONFIG.items()} for module in gluon_modules]
    width = hopper_forward.block_d(head_dim)
    saved = [(configs, "forward_block_m"), (configs, "backward_tiles"),
             (group_split, "split_for"), (hopper_forward, "supports"),
             (hopper_backward, "supports"), (hopper_dq, "supports")]
    old = [(mod, name, getattr(mod, name)) for mod, name in saved]
    bucket = {64: 64, 128: 128, 256: 256}.get(configs.block_d(head_dim), 512)
    try:
        for part in filter(None, trial.split("+")):
            name, *nums = part.split(":")
            vals = [] if name in NAMED_TRIALS else [int(x) for x in nums]
            if name == "fwd":
                bm, rest = vals[0], tuple(vals[1:])
                configs.DEFAULTS["fwd"][(bucket, bm)] = rest
                configs.forward_block_m = lambda d, bm=bm: bm
            elif name in ("dkdv", "dq"):
                outer, rest = vals[0], tuple(vals[1:])
                configs.DEFAULTS[name][(bucket, outer)] = rest
                if name == "dkdv":
                    configs.backward_tiles = (lambda d, c, o=outer, prev=configs.backward_tiles:
                                              (o, prev(d, c)[1]))
                else:
                    configs.backward_tiles = (lambda d, c, o=outer, prev=configs.backward_tiles:
                                              (prev(d, c)[0], o))
            elif name == "split":
                group_split.split_for = lambda problem, device, n=vals[0]: n
            elif name == "tl":
                hopper_forward.supports = lambda *a, **k: False
                hopper_backward.supports = lambda *a, **k: False
            elif name == "tldq":
                hopper_dq.supports = lambda *a, **k: False
            elif name == "tldkdv":
                hopper_backward.supports = lambda *a, **k: False
            elif name == "gdq":
                hopper_dq.CONFIG["block_n"][hopper_forward.block_d(head_dim) or head_dim] = vals[0]
                hopper_dq.CONFIG["stages"] = vals[1]
            elif name == "gdev" and vals:
                for kernel in (hopper_backward, hopper_dq):
                    kernel.CONFIG["device_offsets_above"] = {64: vals[0]}
            elif name == "gdev":
                hopper_backward.CONFIG["device_offsets"] = (64, 128, 256)
                hopper_dq.CONFIG["device_offsets"] = (64, 128, 256)
            elif name == "gdkdv":
                hopper_backward.CONFIG["block_m"][width] = vals[0]
                hopper_backward.CONFIG["stages"] = vals[1]
            elif name == "gfwdm":
                hopper_forward.CONFIG["block_m"][width] = vals[0]
            elif name == "gdqm":
                hopper_dq.CONFIG["block_m"][width] = vals[0]
            elif name == "gdkdvn":
                hopper_backward.CONFIG["block_n"][width] = vals[0]
            elif name == "gsplitm":
                hopper_backward.CONFIG["split_block_m"] = vals[0]
                hopper_backward.CONFIG["split_causal_rows"] = (0, vals[0])
            elif name == "gwide":
                second = hopper_dkdv_wide.second_width(head_dim,
                                                       hopper_backward.CONFIG["split"])
                hopper_backward.CONFIG["wide"][second] = (vals[0], vals[1])
            elif name == "gfwd":
                hopper_forward.CONFIG["block_n"][width] = vals[0]
                hopper_forward.CONFIG["stages"] = vals[1]
            elif name == "gpad":
                kernels = {"fwd": hopper_forward, "dkdv": hopper_backward, "dq": hopper_dq}
                for kernel in nums or kernels:
                    kernels[kernel].CONFIG["split"] = False
            elif name == "tilesfirst":
                hopper_forward.CONFIG["grouped_heads"] = False
            elif name == "gunbounded":
                hopper_backward.CONFIG["right_unbounded"] = True
            elif name == "gprefetch":
                hopper_backward.CONFIG["prefetch"] = (
                    () if nums == ["off"] else (*hopper_backward.CONFIG["prefetch"], width))
            else:
                raise SystemExit(f"unknown override {part!r}")
        forward._replays.clear()
        backward._replays.clear()
        yield
    finally:
        for mod, name, value in old:
            setattr(mod, name, value)
        configs.DEFAULTS.clear()
        configs.DEFAULTS.update(saved_defaults)
        for module, config in zip(gluon_modules, saved_gluon, strict=True):
            module.CONFIG.clear()
            module.CONFIG.update(config)
        forward._replays.clear()
        backward._replays.clear()


def max_error(cell, backend: str, backward_: bool, offsets: str = "varlen-info") -> float:
    """Largest |backend - float64 reference| over out (forward) or dq, dk, dv on a small
    mixed-length batch with the cell's heads, head dim, dtype and mask; ``offsets`` as the
    timed run passes them (host lengths, or device cu_seqlens tensors only)."""
    lengths = [300, 1, 77, 0, 129, 520]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    lens = (info, info)
    if offsets == "tensors":
        lens = (info.cu_seqlens, info.cu_seqlens, max(lengths), max(lengths))
    g = torch.Generator(device="cuda").manual_seed(0)
    dtype = getattr(torch, cell.dtype)
    q, k, v = (torch.randn(info.total, h, cell.head_dim, device="cuda", dtype=dtype,
                           generator=g).requires_grad_() for h in (cell.nheads, cell.nheads_k,
                                                                  cell.nheads_k))
    kw = {"causal": cell.causal}
    if cell.window is not None:
        kw["window_size"] = cell.window
    if cell.softcap:
        kw["softcap"] = cell.softcap
    if cell.alibi:
        kw["alibi_slopes"] = cell_slopes(cell, "cuda")
    out = attnhub.attention_forward_varlen(q, k, v, *lens, backend=backend, **kw)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention_forward_varlen(*ref_in, info, info, backend="reference", **kw)
    if not backward_:
        return (out.double() - ref).abs().max().item()
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    return max((a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads,
                                                                    strict=True))


def sweep_classes(patterns: list[str], trials: list[str]) -> list[dict]:
    """Each trial's triton time on the tune classes matching ``patterns`` (and torch-flash's
    once per class), printed a line per (class, trial); the rows as dicts."""
    import fnmatch

    from attnhub import tune

    device = torch.device("cuda")
    rows = []
    for case in tune.default_cases("cuda"):
        key = case.intended().key()
        if not any(fnmatch.fnmatchcase(key, p) for p in patterns):
            continue
        kwargs = tune.build_call(case, device)
        ms_fa2 = tune.measure(tune._runner(kwargs, "torch-flash", case.backward), device,
                              10.0, 40.0)
        print(f"{key}: torch-flash {ms_fa2:.4f} ms", flush=True)
        row = {"class": key, "torch-flash": ms_fa2}
        for trial in trials:
            label = trial or "shipped"
            try:
                with overrides(trial, case.head_dim):
                    ms = tune.measure(tune._runner(kwargs, "triton", case.backward), device,
                                      10.0, 40.0)
            except Exception as exc:  # out of shared memory or registers for this config
                print(f"  {label}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            row[label] = ms
            print(f"  {label}: {ms:.4f} ms ({ms_fa2 / ms:.2f}x torch-flash)", flush=True)
        rows.append(row)
        del kwargs
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default="d192,d256")
    parser.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    parser.add_argument("--trials", nargs="*", default=[""])
    parser.add_argument("--offsets", choices=("varlen-info", "tensors"), default="varlen-info",
                        help="how attnhub gets the lengths: host lengths (a VarlenInfo) or "
                             "device cu_seqlens tensors only, as flash_attn callers pass them")
    parser.add_argument("--classes", nargs="*", default=None, metavar="PATTERN",
                        help="attnhub tune classes to time (shell patterns on their keys) "
                             "instead of --cells")
    parser.add_argument("--json", default=None,
                        help="write the rows here ({'class' or 'cell', 'torch-flash', "
                             "trial label: ms, ...} a class or cell)")
    args = parser.parse_args()
    rows = (sweep_classes(args.classes, args.trials) if args.classes
            else sweep_cells(args.cells.split(","), args.mode, args.trials, args.offsets))
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


def sweep_cells(names: list[str], mode: str, trials: list[str], offsets: str) -> list[dict]:
    """Each trial's triton time and error on the matrix cells ``names`` in ``mode``, next to
    torch's FA2 called directly, printed a line per (cell, trial); the rows as dicts."""
    cells = {c.name: c for c in build_matrix(profile_for("cuda"))}
    backward_ = mode == "fwd+bwd"
    fa2 = next(d for d in direct_kernels_for(["torch-flash"]) if d.label == "torch-flash (direct)")
    rows = []
    for name in names:
        cell = cells[name]
        flops = cell.flops(mode)
        why = fa2.unsupported(cell)
        if why is None:
            x = make_inputs(cell, torch.device("cuda"), backward_)
            ms_fa2 = do_bench(fa2.build(x, backward_), warmup=25, rep=100,
                              return_mode="median")
            err_fa2 = max_error(cell, "torch-flash", backward_)
            row = {"cell": name, "torch-flash": ms_fa2}
            print(f"{name} {mode}: torch-flash (direct) {ms_fa2:.3f} ms "
                  f"{flops / ms_fa2 / 1e9:.1f} TFLOP/s, error {err_fa2:.2e}", flush=True)
        else:  # softcap, ALiBi: the reference in the cell's dtype bounds the error
            ms_fa2 = None
            err_fa2 = max_error(cell, "reference", backward_)
            row = {"cell": name}
            print(f"{name} {mode}: torch-flash (direct) not timed ({why}); the reference's "
                  f"error {err_fa2:.2e}", flush=True)
        for trial in trials:
            label = trial or "shipped"
            try:
                with overrides(trial, cell.head_dim):
                    x = make_inputs(cell, torch.device("cuda"), backward_)  # fresh tile plans
                    ms = do_bench(attnhub_runner(x, "triton", backward_, offsets),
                                  warmup=25, rep=100, return_mode="median")
                    err = max_error(cell, "triton", backward_, offsets)
            except Exception as exc:  # out of shared memory or registers for this config
                print(f"  {label}: failed: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
                continue
            wrong = "  WRONG" if err > 2 * err_fa2 + 1e-3 else ""
            ratio = f" ({ms_fa2 / ms:.2f}x torch-flash)" if ms_fa2 is not None else ""
            print(f"  {label}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s{ratio}, "
                  f"error {err:.2e}{wrong}", flush=True)
            if not wrong:  # a wrong result has no time to compare
                row[label] = ms
        rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
