"""The `attnhub` command: info, conformance, run, tune."""

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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        data = info_mod.collect()
        print(json.dumps(data, indent=2) if args.json else info_mod.render(data))
        return 0
    if args.command == "tune":
        return _tune(args)
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
