"""The `attnhub` command: info, conformance, run, bench, tune."""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import info as info_mod
from . import main_job


def _lengths(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if not values or any(n < 0 for n in values) or not any(values):
        raise argparse.ArgumentTypeError("expected one or more lengths >= 0, not all 0")
    return values


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _output_file(text: str) -> str:
    """A file path whose folder exists (checked before the suite runs, not after)."""
    folder = os.path.dirname(text) or "."
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"folder {folder!r} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, expected a file name")
    return text


def _device(text: str) -> str:
    """A device string torch can parse whose device type is available on this machine."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a device (expected e.g. cpu, cuda, cuda:1, npu)") from None
    if device.type not in ("cpu", "meta"):
        module = getattr(torch, device.type, None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise argparse.ArgumentTypeError(
                f"device {text!r} is not available here (torch {torch.__version__}); "
                "`attnhub info` lists the devices")
        if device.index is not None and device.index >= module.device_count():
            raise argparse.ArgumentTypeError(
                f"device {text!r}: only {module.device_count()} {device.type} device(s) here")
    return text


def _window(text: str) -> tuple[int, int]:
    parts = text.split(",")
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT or W, got {text!r}") from None
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise argparse.ArgumentTypeError(f"expected LEFT,RIGHT or W, got {text!r}")


def _names(text: str) -> list[str]:
    names = [x for x in text.replace(" ", "").split(",") if x]
    if not names:
        raise argparse.ArgumentTypeError("expected one or more comma-separated names")
    return names


def _part(text: str) -> tuple[int, int]:
    try:
        k, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected K/N (e.g. 1/2), got {text!r}") from None
    if not 1 <= k <= n:
        raise argparse.ArgumentTypeError(f"expected 1 <= K <= N, got {text!r}")
    return k, n


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def _existing_file(text: str) -> str:
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a file")
    return text


def _add_bench(sub) -> None:
    p = sub.add_parser(
        "bench", help="time every backend side by side on a workload matrix (forward and "
                      "forward+backward); writes bench.md, bench.json and bench.png",
        description="Runs the workload matrix (docs/bench.md) on one device: every "
                    "available backend forced by name, attnhub's automatic choice (auto) and "
                    "the external kernels the CUDA adapters wrap, called directly. Writes "
                    "bench.md, bench.json and bench.png (with matplotlib) into --output.")
    p.add_argument("--device", type=_device, default=None,
                   help="default: cuda if available (else another accelerator, else cpu); "
                        "the cpu profile scales the cells down to fp32 CPU sizes")
    p.add_argument("--backends", type=_names, default=None, metavar="A,B",
                   help="attnhub backends to measure, plus 'auto' for the automatic choice "
                        "(default: every backend available for the device and auto)")
    p.add_argument("--no-direct", dest="direct", action="store_false",
                   help="do not call the wrapped kernels (torch's FA2, flash_attn, FA3, FA4) "
                        "directly")
    p.add_argument("--quick", action="store_true", help="the quick subset of cells")
    p.add_argument("--cells", type=_names, default=None, metavar="PATTERN,...",
                   help="only cells whose name matches one of these shell patterns "
                        "(--list shows the names)")
    p.add_argument("--part", type=_part, default=None, metavar="K/N",
                   help="every N-th of the selected cells starting at the K-th: splits a run "
                        "over N calls, merged afterwards with --merge")
    p.add_argument("--output", default="attnhub-bench", metavar="DIR",
                   help="folder for bench.md, bench.json, bench.png (default %(default)s)")
    p.add_argument("--offsets", choices=("varlen-info", "tensors"), default="varlen-info",
                   help="how attnhub receives cu_seqlens: a VarlenInfo (default) or device "
                        "int32 tensors with max_seqlen, as the direct kernels do")
    p.add_argument("--seed", type=int, default=0, help="length draws and input data")
    p.add_argument("--time-limit", type=_seconds, default=None, metavar="S",
                   help="start no cell after S seconds (the rest are reported as skipped)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    p.add_argument("--list", action="store_true", help="print the selected cells and exit")
    p.add_argument("--merge", type=_existing_file, nargs="+", default=None,
                   metavar="BENCH.json",
                   help="run nothing: merge these earlier reports into --output")


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="attnhub", description="Variable-length attention for every accelerator.")
    parser.add_argument("--version", action="version", version=f"attnhub {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p_info = sub.add_parser("info", help="versions, devices, backends and why each can or "
                                         "cannot run, capability table")
    p_info.add_argument("--json", action="store_true", help="print the report as JSON")

    p_conf = sub.add_parser(
        "conformance", help="check backends against the reference in float64 (exit 1 on any "
                            "failure)")
    p_conf.add_argument("--backend", action="append", default=None, metavar="NAME",
                        help="backend to check (repeatable; default: every backend available "
                             "for the device)")
    p_conf.add_argument("--device", type=_device, default=None,
                        help="default: the best device here")
    p_conf.add_argument("--tier", choices=("quick", "full"), default="quick")
    p_conf.add_argument("--report", type=_output_file, default="conformance-report.md",
                        metavar="FILE.md",
                        help="markdown report (default %(default)s)")
    p_conf.add_argument("--json", type=_output_file, default="conformance-report.json",
                        metavar="FILE.json",
                        help="JSON report (default %(default)s)")
    p_conf.add_argument("-k", dest="keyword", action="append", default=None,
                        help="only cases whose id contains this text (repeatable: any of them)")
    p_conf.add_argument("--feature", action="append", default=None, metavar="NAME",
                        help="only cases of this report column, e.g. window (repeatable)")
    p_conf.add_argument("--surface", default=None,
                        choices=("flash_attn", "paddle", "flashattention_plus"),
                        help="run the cases through this drop-in surface instead of "
                             "attention_forward_varlen")

    d = main_job.JobConfig()
    p_run = sub.add_parser(
        "run", help="run a packed batch of mixed lengths through dispatch, check it against "
                    "the reference and time it (defaults: the embedded job)")
    default_lengths = ",".join(map(str, d.lengths))
    p_run.add_argument("--lengths", type=_lengths, default=d.lengths,
                       help=f"comma-separated sequence lengths (default {default_lengths})")
    p_run.add_argument("--heads", type=_positive, default=d.nheads, help="query heads")
    p_run.add_argument("--kv-heads", type=_positive, default=d.nheads_k, help="key/value heads")
    p_run.add_argument("--head-dim", type=_positive, default=d.head_dim)
    p_run.add_argument("--causal", action=argparse.BooleanOptionalAction, default=d.causal)
    p_run.add_argument("--window", type=_window, default=None, help="LEFT,RIGHT or W")
    p_run.add_argument("--softcap", type=float, default=d.softcap)
    p_run.add_argument("--dtype", choices=("float16", "bfloat16", "float32", "float64"),
                       default=None, help="default: bfloat16 on an accelerator, float32 on CPU")
    p_run.add_argument("--device", type=_device, default=None,
                       help="default: the best device here")
    p_run.add_argument("--backend", default=None, help="force a backend by name")
    p_run.add_argument("--grad", action=argparse.BooleanOptionalAction, default=d.grad,
                       help="also check and time the backward pass")
    p_run.add_argument("--repeats", type=_positive, default=d.repeats)
    p_run.add_argument("--seed", type=int, default=d.seed)

    p_tune = sub.add_parser(
        "tune", help="measure every backend per problem class on this device and store the "
                     "cost table that automatic selection then uses (docs/backends.md)")
    p_tune.add_argument("--device", type=_device, default=None,
                        help="default: the best device here")
    p_tune.add_argument("--backend", action="append", default=None, metavar="NAME",
                        help="backend to measure (repeatable; default: every available backend "
                             "automatic selection can pick, the reference only on the CPU)")
    p_tune.add_argument("--classes", action="append", default=None, metavar="PATTERN",
                        help="only classes whose key matches this shell pattern, e.g. "
                             "'bfloat16/d128/*/causal/*' (repeatable: any of them)")
    p_tune.add_argument("--output", type=_output_file, default=None, metavar="FILE.json",
                        help="where to write the table (default: the user-tuned table of this "
                             "device in the cache directory, which selection reads)")
    p_tune.add_argument("--budget-s", type=float, default=None, metavar="SECONDS",
                        help="start no new class after this many seconds")
    p_tune.add_argument("--resume", action="store_true",
                        help="skip classes the output table already holds")
    p_tune.add_argument("--match-name", default=None, metavar="REGEX",
                        help="write a shipped table: it applies to every device of this type "
                             "and compute capability whose name matches REGEX")
    p_tune.add_argument("--full", action="store_true",
                        help="measure every mask at every head dim and GQA ratio (about 5x "
                             "the default list)")
    p_tune.add_argument("--rep-ms", type=float, default=40.0,
                        help="timing repeats per measurement, in ms (default %(default)s)")
    p_tune.add_argument("--list", action="store_true",
                        help="print the class keys that would be measured and exit")
    _add_bench(sub)
    return parser


def _tune(args: argparse.Namespace) -> int:
    from . import tune
    from .errors import AttnhubError

    device = args.device or str(main_job.best_device())
    if args.list:
        import fnmatch

        import torch

        for case in tune.default_cases(torch.device(device).type, args.full):
            key = case.intended().key()
            if not args.classes or any(fnmatch.fnmatchcase(key, p) for p in args.classes):
                print(key)
        return 0
    try:
        result = tune.tune(device, backends=args.backend, patterns=args.classes,
                           output=args.output, budget_s=args.budget_s, resume=args.resume,
                           match_name=args.match_name, full=args.full, rep_ms=args.rep_ms)
    except AttnhubError as exc:
        print(f"attnhub tune: {exc}", file=sys.stderr)
        return 2
    return 0 if result.measured or result.skipped else 1


def _bench(args: argparse.Namespace) -> int:
    from .bench import command
    from .registry import get_registry

    if args.merge:
        try:
            report = command.merge_files(args.merge)
        except (ValueError, KeyError, json.JSONDecodeError) as exc:
            print(f"attnhub bench: --merge: {exc}", file=sys.stderr)
            return 2
    else:
        known = set(get_registry().names()) | {"auto"}
        unknown = [b for b in args.backends or [] if b not in known]
        if unknown:
            print(f"attnhub bench: --backends: unknown backend(s) {', '.join(unknown)}; "
                  f"known: {', '.join(sorted(known))}", file=sys.stderr)
            return 2
        request = command.BenchRequest(
            device=args.device or str(main_job.best_device()), output=args.output,
            backends=args.backends, quick=args.quick, cells=args.cells, part=args.part,
            direct=args.direct, offsets=args.offsets, seed=args.seed,
            time_limit_s=args.time_limit, progress=args.progress,
            command="attnhub " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"]
            else "attnhub bench")
        try:
            cells = command.plan_cells(request)
        except ValueError as exc:
            print(f"attnhub bench: {exc}", file=sys.stderr)
            return 2
        if args.list:
            for c in cells:
                print(f"{c.name:14} {c.axis:9} {c.description}")
            return 0
        if not cells:
            print("attnhub bench: no cell selected", file=sys.stderr)
            return 2
        report = command.run_bench(request)
    for path in command.write_outputs(report, args.output):
        print(f"wrote {path}")
    print(command.summary(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        data = info_mod.collect()
        print(json.dumps(data, indent=2) if args.json else info_mod.render(data))
        return 0
    if args.command == "tune":
        return _tune(args)
    if args.command == "bench":
        return _bench(args)
    if args.command == "conformance":
        from .conformance.cli import run_conformance

        return run_conformance(args.backend, args.device, args.tier, args.report, args.json,
                               args.keyword, args.feature, args.surface)
    cfg = main_job.JobConfig(
        lengths=args.lengths, nheads=args.heads, nheads_k=args.kv_heads,
        head_dim=args.head_dim, causal=args.causal, window=args.window, softcap=args.softcap,
        dtype=args.dtype, device=args.device, backend=args.backend, grad=args.grad,
        repeats=args.repeats, seed=args.seed)
    from .errors import AttnhubError

    try:
        result = main_job.run_job(cfg)
    except AttnhubError as exc:
        print(f"attnhub run: {exc}", file=sys.stderr)
        return 2
    print(main_job.render(cfg, result))
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
