"""Plot docs/performance.md's per-version tables: the Triton backend's forward and
forward + backward throughput as a multiple of torch's FA2 measured in the same run (W1-W3,
causal and not), and the W4 decode's share of the copy bandwidth.

Run anywhere with matplotlib (no GPU): python benchmarks/plot_performance.py
(writes docs/img/triton-vs-fa2.png).
"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "performance.md"
OUT = ROOT / "docs" / "img" / "triton-vs-fa2.png"

_SECTION = re.compile(r"^## (v\w+):", re.M)
_ROW = re.compile(r"^\| (W[123] (?:non-causal|causal)) \| [\d.]+ \(([\d.]+)x[^|]*\| "
                  r"[\d.]+ \(([\d.]+)x", re.M)
_DECODE = re.compile(r"^\| W4 decode \| ([\d.]+)% of", re.M)


def parse(text: str) -> dict[str, dict]:
    """{version: {"fwd": {workload: ratio}, "fwdbwd": {...}, "decode": percent}} for every
    version section with a W1-W3 table."""
    marks = list(_SECTION.finditer(text))
    versions: dict[str, dict] = {}
    for i, mark in enumerate(marks):
        body = text[mark.end():marks[i + 1].start() if i + 1 < len(marks) else len(text)]
        rows = _ROW.findall(body)
        if not rows:
            continue
        decode = _DECODE.search(body)
        versions[mark.group(1)] = {
            "fwd": {w: float(f) for w, f, _ in rows},
            "fwdbwd": {w: float(b) for w, _, b in rows},
            "decode": float(decode.group(1)) if decode else None,
        }
    return versions


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    versions = parse(PAGE.read_text())
    names = list(versions)
    workloads = list(next(iter(versions.values()))["fwd"])
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    for ax, key, title in ((axes[0], "fwd", "forward / torch FA2"),
                           (axes[1], "fwdbwd", "forward + backward / torch FA2")):
        for w in workloads:
            ax.plot(names, [versions[v][key].get(w) for v in names], marker="o", label=w)
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(title)
        ax.set_xlabel("Triton backend version")
        ax.set_ylabel("x torch's FA2 (same run)")
    axes[0].legend(fontsize=8)
    decode = [versions[v]["decode"] for v in names]
    axes[2].bar(names, [d or 0 for d in decode], color="tab:purple")
    axes[2].set_title("W4 decode: % of copy bandwidth")
    axes[2].set_ylim(0, 100)
    fig.suptitle("attnhub Triton backend on an H200 (bf16, 32/8 heads, head_dim 128)")
    fig.tight_layout()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=110)
    print(f"wrote {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
