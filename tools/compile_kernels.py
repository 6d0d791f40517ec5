"""Compile the Triton backend's kernels for a GPU architecture on a machine without a GPU.

Runs the backend's own launchers (forward.forward, backward.backward, decode.forward, and
the Gluon launchers hopper_forward.forward / hopper_backward.dkdv / hopper_dq.dq) with CPU
tensors, with
Triton's launch replaced by a compile for an explicit target, then reports each kernel's
registers, spills and shared memory from ptxas, and writes its PTX (to diff two versions of
a kernel: an edit that should not change the code shows up as parameter lists only).
What the kernels compute is not checked here: the interpreter tests and the GPU tests do
that. The Gluon kernels need the Triton version the GPU machine runs (its Gluon API moves
between releases).

    python tools/compile_kernels.py --out /tmp/ptx [--sinks] [--arch 90] \
        [--config hopper_backward.prefetch=64,128,256 ...]

``--config MODULE.KEY=N,N`` sets a Gluon module's CONFIG entry (a tuple of ints; ``=`` alone:
the empty tuple) before compiling, to read an option's registers and spills;
``MODULE.KEY.M=N,N`` one row of an entry that is a table (``hopper_backward.wide.64=64,2``,
``hopper_backward.block_n.64=192``).

attnhub is imported from this checkout (backends/ included), whatever other checkout an
editable install in the environment points to.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import pathlib
import re
import subprocess
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real JIT functions, before triton is imported

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

ROOT = pathlib.Path(__file__).resolve().parents[1]
COMPILED: list[tuple[str, object]] = []
LABEL = [""]  # the variant being launched, appended to the kernel's name


def use_this_checkout() -> None:
    """Imports attnhub and the folders pyproject maps into it (backends/, conformance/) from
    the checkout this script lives in: an editable install of another checkout in the same
    environment would otherwise supply attnhub.backends, and the kernels compiled would not
    be the ones beside this script."""
    sys.path.insert(0, str(ROOT))
    import attnhub

    if pathlib.Path(attnhub.__file__).resolve().parent != ROOT / "attnhub":
        raise SystemExit(f"attnhub is imported from {attnhub.__file__}, not from {ROOT}")
    for name, folder in (("attnhub.backends", "backends"),
                         ("attnhub.conformance", "conformance")):
        spec = importlib.util.spec_from_file_location(
            name, ROOT / folder / "__init__.py", submodule_search_locations=[str(ROOT / folder)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def compile_instead_of_launch(target: GPUTarget) -> None:
    """JITFunction.run compiles for ``target`` and records the kernel; nothing launches."""
    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound,
                                                                specialization, options)
        source = ASTSource
        if getattr(self, "is_gluon", lambda: False)():
            from triton.experimental.gluon._runtime import GluonASTSource as source
        kernel = triton.compile(source(self, signature, constexprs, attrs), target=target,
                                options=options.__dict__)
        COMPILED.append((self.__name__ + LABEL[0], kernel))
        return kernel

    JITFunction.run = run


def launch_all(sinks: bool) -> None:
    """One launch of every kernel family: tiled forward and backward (plain causal, and
    softcap + window), the split-KV decode, the Gluon dK/dV, and the Gluon forward in each
    build of GLUON_FORWARDS."""
    import attnhub
    from attnhub.backends.triton import (
        backward,
        decode,
        forward,
        group_split,
        hopper_backward,
        hopper_dq,
        hopper_forward,
    )

    decode.num_splits = lambda problem, device: 4  # reads the device's SM count otherwise
    g = torch.Generator().manual_seed(0)
    kw = {"sinks": torch.zeros(8)} if sinks else {}
    lq, lk = [300, 5, 0, 129], [300, 0, 77, 600]
    info_q, info_k = (attnhub.VarlenInfo.from_lengths(x) for x in (lq, lk))
    k = torch.randn(sum(lk), 2, 128, dtype=torch.float16, generator=g)
    for features in ({"causal": True}, {"softcap": 5.0, "window_size": (64, 0)}):
        q = torch.randn(sum(lq), 8, 128, dtype=torch.float16, generator=g)
        problem, inputs = attnhub.normalize(q, k, k, info_q, info_k, **features)
        out, lse = forward.forward(problem, inputs, None, **kw)
        backward.backward(problem, inputs, out, lse, q, None, None, **kw)
        if features.get("causal"):  # dK/dV with a group split: float32 partials
            group_split.split_for, unsplit = (lambda problem, device: 2), group_split.split_for
            backward.backward(problem, inputs, out, lse, q, None, None, **kw)
            group_split.split_for = unsplit
        if features.get("causal") and hopper_forward.available():
            k_tiles = dkdv_tiles(problem, inputs)
            hopper_backward.dkdv(problem, q, k, k, q, lse, lse, k.clone(), k.clone(),
                                 inputs.cu_seqlens_q, inputs.cu_seqlens_k, k_tiles, 0.1)
            dk, dv = group_split.partials(k, problem.nheads_k, 2)
            hopper_backward.dkdv(problem, q, k, k, q, lse, lse, dk, dv, inputs.cu_seqlens_q,
                                 inputs.cu_seqlens_k, k_tiles, 0.1, split=2)
            LABEL[0] = " [device tiles]"
            hopper_backward.dkdv(problem, q, k, k, q, lse, lse, k.clone(), k.clone(),
                                 inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                                 dkdv_tiles(problem, inputs, True), 0.1)
            LABEL[0] = ""
            for device_tiles in (False, True):
                LABEL[0] = " [device tiles]" if device_tiles else ""
                tiles = dq_tiles(problem, inputs, device_tiles)
                hopper_dq.dq(problem, q, k, k, q, lse, lse, q.clone(), inputs.cu_seqlens_q,
                             inputs.cu_seqlens_k, tiles, 0.1)
            LABEL[0] = ""
    if hopper_forward.available():  # the Gluon backward at the other head dims: the narrow
        # dK/dV's widths with host and device tiles, width 256 (hopper_dkdv_wide) with host ones
        for head_dim, how, tile_modes in ((64, " width 64", (False, True)),
                                          (96, " 64 + 32 columns", (False, True)),
                                          (112, " padded to 128", (False, True)),
                                          (256, "", (False,)), (192, "", (False,))):
            qb = torch.randn(sum(lq), 8, head_dim, dtype=torch.float16, generator=g)
            kb = torch.randn(sum(lk), 2, head_dim, dtype=torch.float16, generator=g)
            problem, inputs = attnhub.normalize(qb, kb, kb, info_q, info_k, causal=True)
            lse_b = torch.empty(8, problem.total_q)
            cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
            for device_tiles in tile_modes:
                LABEL[0] = (f" [causal d{head_dim}{how}"
                            + (", device tiles]" if device_tiles else "]"))
                hopper_backward.dkdv(problem, qb, kb, kb, qb, lse_b, lse_b, kb.clone(),
                                     kb.clone(), cu_q, cu_k,
                                     dkdv_tiles(problem, inputs, device_tiles), 0.1)
                hopper_dq.dq(problem, qb, kb, kb, qb, lse_b, lse_b, qb.clone(), cu_q, cu_k,
                             dq_tiles(problem, inputs, device_tiles), 0.1)
        LABEL[0] = ""
    if hopper_forward.available():  # the Gluon dQ and dK/dV without a causal mask, left
        # window only (the dK/dV takes those calls with CONFIG["right_unbounded"])
        q = torch.randn(sum(lq), 8, 128, dtype=torch.float16, generator=g)
        for label, features in (("full", {}), ("left window", {"window_size": (64, -1)})):
            LABEL[0] = f" [{label}]"
            problem, inputs = attnhub.normalize(q, k, k, info_q, info_k, **features)
            tiles = dq_tiles(problem, inputs)
            hopper_dq.dq(problem, q, k, k, q, lse, lse, q.clone(), inputs.cu_seqlens_q,
                         inputs.cu_seqlens_k, tiles, 0.1)
            hopper_backward.dkdv(problem, q, k, k, q, lse, lse, k.clone(), k.clone(),
                                 inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                                 dkdv_tiles(problem, inputs), 0.1)
        LABEL[0] = ""
    q = torch.randn(4, 8, 128, dtype=torch.float16, generator=g)
    problem, inputs = attnhub.normalize(q, k, k, attnhub.VarlenInfo.from_lengths([1] * 4),
                                        info_k)
    decode.forward(problem, inputs, **kw)
    if hopper_forward.available():
        for label, features, head_dim in GLUON_FORWARDS:
            LABEL[0] = f" [{label}]"
            kq, kk = (torch.randn(sum(x), n, head_dim, dtype=torch.float16, generator=g)
                      for x, n in ((lq, 8), (lk, 2)))
            features = dict(features)
            device_tiles = features.pop("device_tiles", False)
            problem, inputs = attnhub.normalize(kq, kk, kk, info_q, info_k, **features)
            gluon_forward(problem, inputs, kw.get("sinks"), device_tiles)
        LABEL[0] = ""


# (label, features, head dim) of the Gluon forward builds compiled
GLUON_FORWARDS = [
    ("causal d128", {"causal": True}, 128),
    ("causal d64", {"causal": True}, 64),
    ("softcap d128", {"softcap": 30.0}, 128),
    ("softcap causal d64", {"softcap": 30.0, "causal": True}, 64),
    ("softcap window d128", {"softcap": 30.0, "window_size": (64, 0)}, 128),
    ("alibi d128", {"alibi_slopes": torch.rand(8)}, 128),
    ("alibi causal d64", {"alibi_slopes": torch.rand(8), "causal": True}, 64),
    ("alibi per-batch softcap window d128",
     {"alibi_slopes": torch.rand(4, 8), "softcap": 30.0, "window_size": (64, 3)}, 128),
    ("device-tiles causal d128", {"device_tiles": True, "causal": True}, 128),
    ("causal d256", {"causal": True}, 256),
    ("softcap alibi window d256",
     {"softcap": 30.0, "alibi_slopes": torch.rand(8), "window_size": (64, 0)}, 256),
    ("device-tiles alibi softcap d64",
     {"device_tiles": True, "alibi_slopes": torch.rand(8), "softcap": 30.0}, 64),
    ("causal d96 (64 + 32 columns)", {"causal": True}, 96),
    ("causal d192 (128 + 64 columns)", {"causal": True}, 192),
    ("device-tiles softcap window d80 (64 + 16 columns)",
     {"device_tiles": True, "softcap": 30.0, "window_size": (64, 0)}, 80),
    ("causal d112 (padded to 128)", {"causal": True}, 112),
    ("causal d224 (padded to 256)", {"causal": True}, 224),
]


def dkdv_tiles(problem, inputs, device_tiles: bool = False) -> tuple:
    """The Gluon dK/dV's launch tiles over the keys (launch_tiles)."""
    from attnhub.backends.triton import hopper_backward

    return launch_tiles(problem, inputs.cu_seqlens_k, hopper_backward.block_n(problem.head_dim),
                        False, device_tiles)


def dq_tiles(problem, inputs, device_tiles: bool = False) -> tuple:
    """The Gluon dQ's launch tiles over the queries (launch_tiles)."""
    from attnhub.backends.triton import hopper_dq

    return launch_tiles(problem, inputs.cu_seqlens_q, hopper_dq.block_m(problem.head_dim), True,
                        device_tiles)


def launch_tiles(problem, cu_seqlens, rows: int, rows_are_queries: bool,
                 device_tiles: bool) -> tuple:
    """A launch's tiles of ``rows`` rows as the backend plans them (host lengths here), or
    with ``device_tiles`` the upper bound of programs that find their own tiles, as the
    backend launches calls without host lengths (CPU offsets always count as host lengths)."""
    from attnhub.backends.triton import forward

    if device_tiles:
        total = problem.total_q if rows_are_queries else problem.total_k
        return -(-total // rows) + problem.batch, cu_seqlens, cu_seqlens, True
    return forward.launch_tiles(problem, cu_seqlens, rows, rows_are_queries)


def gluon_forward(problem, inputs, sinks, device_tiles: bool) -> None:
    """The Gluon forward's launch for ``problem``, as forward.forward makes it on an H100;
    ``device_tiles``: as without host lengths (CPU offsets count as host lengths here)."""
    from attnhub.backends.triton import forward, hopper_forward

    out = torch.empty_like(inputs.q)
    lse = torch.empty(problem.nheads, problem.total_q)
    tiles = launch_tiles(problem, inputs.cu_seqlens_q, hopper_forward.block_m(problem.head_dim),
                         True, device_tiles)
    hopper_forward.forward(problem, inputs.q, inputs.k, inputs.v, out, lse,
                           inputs.cu_seqlens_q, inputs.cu_seqlens_k, tiles,
                           forward.score_scalars(problem), sinks, inputs.alibi_slopes)


def ptxas_report(ptx: pathlib.Path, arch: str) -> str:
    ptxas = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    res = subprocess.run([str(ptxas), f"--gpu-name={arch}", "-v", str(ptx), "-o", os.devnull],
                         capture_output=True, text=True, check=True)
    regs = re.findall(r"Used (\d+) registers", res.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", res.stderr)
    return f"registers {max(map(int, regs), default=0)}, spill stores " \
           f"{max(map(int, spills), default=0)} bytes"


def set_config(option: str) -> None:
    """``MODULE.KEY=N,N``: attnhub.backends.triton.MODULE.CONFIG[KEY] = (N, N);
    ``MODULE.KEY.M=N,N``: CONFIG[KEY][M] = (N, N), for an entry that is a table by width."""
    target, _, values = option.partition("=")
    module, _, key = target.partition(".")
    key, _, sub = key.partition(".")
    config = importlib.import_module(f"attnhub.backends.triton.{module}").CONFIG
    if key not in config:
        raise SystemExit(f"{module}.CONFIG has no {key!r}: {sorted(config)}")
    value = tuple(int(x) for x in values.split(",") if x)
    if sub:  # one number: the row's value itself (CONFIG["block_n"][64] = 192)
        config[key][int(sub)] = value[0] if len(value) == 1 else value
    else:
        config[key] = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for the kernels' PTX")
    parser.add_argument("--arch", type=int, default=90, help="compute capability (90: sm_90a)")
    parser.add_argument("--sinks", action="store_true", help="the launches carry sinks")
    parser.add_argument("--config", action="append", default=[], metavar="MODULE.KEY=N,N",
                        help="set a Gluon kernel module's CONFIG entry (repeatable)")
    args = parser.parse_args()
    use_this_checkout()
    for option in args.config:
        set_config(option)
    compile_instead_of_launch(GPUTarget("cuda", args.arch, 32))
    launch_all(args.sinks)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    for i, (name, kernel) in enumerate(COMPILED):
        path = out / (f"{i:02d}_" + re.sub(r"[^A-Za-z0-9_]+", "-", name).strip("-") + ".ptx")
        path.write_text(kernel.asm["ptx"])
        print(f"{path.name}: shared {kernel.metadata.shared} bytes, "
              f"{ptxas_report(path, arch)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
