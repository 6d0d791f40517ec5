"""The bench report's figure: TFLOP/s per cell and implementation, forward and
forward+backward (matplotlib, PNG; GFLOP/s when every figure is below 1 TFLOP/s, as on a
CPU). Tiny cells, timed on the host, are left out."""

from __future__ import annotations

from typing import Any

from .matrix import MODES

MISSING_MATPLOTLIB = ("matplotlib is not installed: no plot drawn (the markdown and JSON "
                      "reports are complete; pip install matplotlib, then "
                      "`attnhub bench --merge DIR/bench.json --output DIR` redraws it)")


def matplotlib_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def draw(report: dict[str, Any], path: str) -> None:
    """Grouped bars, one panel per mode, one bar per implementation that ran the cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in report["cells"] if not c["tiny"]]
    impls = report["implementations"]
    by_key = {(m["cell"], m["impl"], m["mode"]): m for m in report["results"]}
    modes = [mode for mode in MODES if any(mode in c["modes"] for c in cells)]
    width = max(8.0, 0.45 * len(cells) * max(1, len(impls)) ** 0.5 + 2)
    fig, axes = plt.subplots(len(modes), 1, figsize=(width, 3.6 * len(modes)), squeeze=False)
    peak = max((m["tflops"] for m in report["results"] if m["status"] == "ok"
                and m["mode"] in modes), default=1.0)
    unit, scale = ("TFLOP/s", 1.0) if peak >= 1.0 else ("GFLOP/s", 1e3)  # CPU figures
    bar = 0.8 / max(1, len(impls))
    colors = plt.get_cmap("tab10")
    for ax, mode in zip(axes[:, 0], modes, strict=True):
        mode_cells = [c for c in cells if mode in c["modes"]]
        for j, impl in enumerate(impls):
            xs, ys = [], []
            for i, c in enumerate(mode_cells):
                m = by_key.get((c["name"], impl, mode))
                if m is not None and m["status"] == "ok":
                    xs.append(i - 0.4 + bar * (j + 0.5))
                    ys.append(m["tflops"] * scale)
            ax.bar(xs, ys, bar, label=impl, color=colors(j % 10))
        ax.set_xticks(range(len(mode_cells)))
        ax.set_xticklabels([c["name"] for c in mode_cells], rotation=45, ha="right")
        ax.set_ylabel(unit)
        ax.set_title(f"{'forward' if mode == 'fwd' else 'forward + backward'}")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize="small", ncol=min(4, max(1, len(impls))))
    meta = report["meta"]
    fig.suptitle(f"attnhub bench, {meta['device_name']}, {meta['date'][:10]}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
