"""The bench report: one JSON document (environment, cells, measurements) and its markdown
rendering; reports of runs split over several calls (``--cells``) merge into one."""

from __future__ import annotations

import datetime
import os
import platform
from typing import Any

import torch

from ..info import ENV_VARS, _version
from .matrix import BACKWARD_FLOP_FACTOR, MODES, Cell

FORMAT = 1
# Anchors per device type, in the order their ratio columns appear: torch's FA2 (and FA4,
# where installed) called directly on CUDA, the reference elsewhere.
ANCHORS = {"cuda": ("torch-flash (direct)", "fa4 (direct)")}
DEFAULT_ANCHORS = ("reference",)
PACKAGES = ("torch", "triton", "flash-attn", "flash_attn_3", "flash-attn-4", "torch-npu")


def device_name(device: torch.device) -> str:
    """A readable name: the GPU model, or the CPU model with its thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} (sm_{props.major}{props.minor})"
    if device.type == "cpu":
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as f:
                model = next((line.split(":", 1)[1].strip() for line in f
                              if line.startswith("model name")), model)
        except OSError:
            pass
        return f"{model}, {torch.get_num_threads()} torch threads"
    return str(device)


def environment(device: torch.device) -> dict[str, Any]:
    """Device, UTC date and time, package versions of this process."""
    from .. import __version__

    versions = {"attnhub": __version__, "python": platform.python_version()}
    versions.update({p: _version(p) for p in PACKAGES})
    versions["torch"] = torch.__version__
    if device.type == "cuda":
        versions["cuda (torch build)"] = torch.version.cuda
    return {
        "environment": {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)},
        "device": str(device),
        "device_type": device.type,
        "device_name": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": {k: v for k, v in versions.items() if v is not None},
    }


def anchors_for(device_type: str, implementations: list[str]) -> list[str]:
    """The anchor implementations measured in this run, for ratio columns."""
    wanted = ANCHORS.get(device_type, DEFAULT_ANCHORS)
    return [a for a in wanted if a in implementations]


def build_report(meta: dict[str, Any], cells: list[Cell], implementations: list[str],
                 results: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON document of one run."""
    flops = {c.name: {m: c.flops(m) for m in c.modes} for c in cells}
    return {
        "format": FORMAT,
        "meta": meta,
        "implementations": implementations,
        "anchors": anchors_for(meta["device_type"], implementations),
        "cells": [{**c.as_dict(), "flops": flops[c.name]} for c in cells],
        "results": results,
    }


def merge_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """One report from several runs of the same device and profile (e.g. the matrix split
    over two calls with --cells): cells and implementations in first-seen order, a later
    measurement of the same (cell, implementation, mode) replacing an earlier one."""
    if not reports:
        raise ValueError("nothing to merge")
    first = reports[0]
    for r in reports[1:]:
        for key in ("device_name", "profile"):
            if r["meta"].get(key) != first["meta"].get(key):
                raise ValueError(f"cannot merge reports of different {key}: "
                                 f"{first['meta'].get(key)!r} and {r['meta'].get(key)!r}")
    cells: dict[str, dict] = {}
    implementations: list[str] = []
    results: dict[tuple, dict] = {}
    for r in reports:
        for c in r["cells"]:
            cells[c["name"]] = c
        implementations += [i for i in r["implementations"] if i not in implementations]
        for m in r["results"]:
            results[m["cell"], m["impl"], m["mode"]] = m
    runs = []
    for r in reports:  # a report merged before contributes its runs
        runs += r["meta"].get("runs") or [
            {k: r["meta"].get(k) for k in ("date", "command", "wall_s")}]
    meta = {**first["meta"], "runs": runs}
    meta["wall_s"] = sum(r["meta"].get("wall_s") or 0.0 for r in reports)
    return {
        "format": FORMAT,
        "meta": meta,
        "implementations": implementations,
        "anchors": anchors_for(meta["device_type"], implementations),
        "cells": list(cells.values()),
        "results": list(results.values()),
    }


def _num(x: float) -> str:
    """3 significant digits, no exponent above 0.001 (CPU figures are small)."""
    if x >= 100:
        return f"{x:.0f}"
    if x >= 0.001:
        return f"{x:.3g}"
    return f"{x:.1e}"


def _fmt_value(m: dict[str, Any] | None, tiny: bool) -> str:
    if m is None:
        return ""
    if m["status"] == "n/a":
        return "n/a"
    if m["status"] != "ok":
        return m["status"]
    return f"{_num(m['host_us'])} us" if tiny else _num(m["tflops"])


def _ratio(m: dict[str, Any] | None, anchor: dict[str, Any] | None) -> str:
    if not m or not anchor or m["status"] != "ok" or anchor["status"] != "ok":
        return "-"
    return f"{anchor['ms'] / m['ms']:.2f}x"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return out


def _provenance(meta: dict[str, Any]) -> str:
    runs = meta.get("runs")
    if runs:
        return (f"Merged (`attnhub bench --merge`) from {len(runs)} runs: "
                + "; ".join(f"`{r['command']}` ({r['date']}, {r.get('wall_s') or 0:.0f} s)"
                            for r in runs) + ".")
    return f"Produced by `{meta['command']}`." if meta.get("command") else ""


def render_markdown(report: dict[str, Any], plot_file: str | None = None) -> str:
    """The markdown page of a report (``plot_file``: the PNG next to it, if drawn)."""
    meta, impls, anchors = report["meta"], report["implementations"], report["anchors"]
    cells = report["cells"]
    by_key = {(m["cell"], m["impl"], m["mode"]): m for m in report["results"]}
    versions = ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
    lines = [
        f"# attnhub bench: {meta['device_name']}, {meta['date'][:10]}", "",
        f"Device `{meta['device']}`: {meta['device_name']}. Date {meta['date']}. {versions}.",
        f"Profile `{meta['profile']}`{' (quick subset)' if meta.get('quick') else ''}, "
        f"offsets passed as {meta['offsets']}, seed {meta['seed']}, "
        f"run time {meta.get('wall_s', 0.0):.0f} s.", "",
        _provenance(meta),
        "",
        ("Environment: " + ", ".join(f"`{k}={v}`" for k, v in meta["environment"].items())
         + "." if meta.get("environment") else ""),
        "",
        "How to read it. Each cell is one call shape (table below); each column an "
        "implementation: an attnhub backend forced with `backend=NAME`, `auto` (attnhub's "
        "own choice, named in the detail table) or an external kernel called directly, "
        "without attnhub (`NAME (direct)`). TFLOP/s = FLOPs / median device time per call "
        f"({meta['timing']}). FLOPs: 4 x head_dim per visible (query, key) pair and query "
        "head for the forward, the visible pairs counted exactly per sequence under the "
        "cell's causal / window / prefix-cache mask; forward+backward counts "
        f"{1 + BACKWARD_FLOP_FACTOR:g}x that (the backward as {BACKWARD_FLOP_FACTOR:g}x the "
        "forward, FlashAttention's convention). Forward+backward inputs require grad and the "
        "time covers the forward and `torch.autograd.grad` of the output. Tiny cells are "
        "host time per call in microseconds (a loop that never waits for the device: what "
        "a training step or a serving loop pays on the CPU side). Inputs are normal random "
        "(seeded). Ratios are the anchor's time over the implementation's (above 1x: "
        f"faster than the anchor); anchors measured in this run: "
        f"{', '.join(anchors) if anchors else 'none'}. `n/a`: the backend's reasons for "
        "declining the cell are in the detail table; `error`: the exception is there.", "",
    ]
    lines += ["## Backends", ""]
    rows = [[i, "measured"] for i in impls]
    rows += [[name, f"not measured: {why}"] for name, why in meta.get("left_out", {}).items()]
    lines += [*_table(["implementation", "status"], rows), ""]

    lines += ["## Cells", ""]
    rows = []
    for c in cells:
        lens = (f"{min(c['seqlens_q'])}-{max(c['seqlens_q'])}" if c["seqlens_q"] else "-")
        lens_k = (f"{min(c['seqlens_k'])}-{max(c['seqlens_k'])}" if c["seqlens_k"] else "-")
        rows.append([f"`{c['name']}`", c["axis"], c["description"], str(c["batch"]),
                     f"{c['total_q']} / {c['total_k']}", f"{lens} / {lens_k}", c["heads"],
                     str(c["head_dim"]), c["dtype"], c["mask"],
                     f"{c['flops']['fwd'] / 1e9:.3g}"])
    header = ["cell", "axis", "what", "seqs", "tokens q / k", "lengths q / k", "heads", "d",
              "dtype", "mask", "GFLOP fwd"]
    lines += [*_table(header, rows), ""]

    for mode in MODES:
        title = "Forward" if mode == "fwd" else "Forward + backward"
        lines += [f"## {title}: TFLOP/s (tiny cells: us per call)", ""]
        rows = []
        for c in cells:
            if mode not in c["modes"]:
                continue
            rows.append([f"`{c['name']}`"] + [_fmt_value(by_key.get((c["name"], i, mode)),
                                                         c["tiny"]) for i in impls])
        lines += [*_table(["cell", *impls], rows), ""]
    if plot_file:
        lines += [f"![TFLOP/s per cell and implementation]({plot_file})", ""]

    for anchor in anchors:
        for mode in MODES:
            title = "forward" if mode == "fwd" else "forward + backward"
            rows = []
            for c in cells:
                if mode not in c["modes"]:
                    continue
                base = by_key.get((c["name"], anchor, mode))
                rows.append([f"`{c['name']}`"] + [_ratio(by_key.get((c["name"], i, mode)), base)
                                                 for i in impls if i != anchor])
            lines += [f"## Against {anchor}, {title} (its time over each one's)", ""]
            lines += [*_table(["cell", *[i for i in impls if i != anchor]], rows), ""]

    lines += ["## Detail", ""]
    rows = []
    for c in cells:
        for mode in c["modes"]:
            for i in impls:
                m = by_key.get((c["name"], i, mode))
                if m is None:
                    continue
                time_text = ("-" if m["status"] != "ok" else
                             f"{_num(m['host_us'])} us" if c["tiny"] else f"{_num(m['ms'])} ms")
                tflops = _num(m["tflops"]) if m["status"] == "ok" else m["status"]
                note = m["reason"] or (f"ran {m['selected']}" if m.get("selected") else "")
                rows.append([f"`{c['name']}`", mode, i, time_text, tflops]
                            + [_ratio(m, by_key.get((c["name"], a, mode))) for a in anchors]
                            + [note])
    lines += _table(["cell", "mode", "implementation", "time", "TFLOP/s",
                     *[f"vs {a}" for a in anchors], "note"], rows)
    return "\n".join(lines) + "\n"
