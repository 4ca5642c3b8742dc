"""A benchmark's result as a grouped bar chart, ``runs/bench/<name>.png``, next to its table.

(The leading underscore keeps it out of ``concord bench --list``.)
"""

from __future__ import annotations

from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "runs" / "bench"


def grouped_bars(
    name: str,
    title: str,
    groups: list[str],
    series: dict[str, list[float | None]],
    ylabel: str,
    log: bool = False,
) -> Path:
    """One group of bars per entry of ``groups``, one bar per series (None: no bar); writes
    ``runs/bench/<name>.png``, says where, and returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {k: v for k, v in series.items() if any(x is not None for x in v)}  # (not run)
    width = 0.8 / max(len(series), 1)
    fig, axis = plt.subplots(figsize=(max(7.0, 1.1 * len(groups) + 2), 3.8))
    for i, (label, values) in enumerate(series.items()):
        shift = (i - (len(series) - 1) / 2) * width
        xs = [g + shift for g, v in enumerate(values) if v is not None]
        axis.bar(xs, [v for v in values if v is not None], width, label=label)
    axis.set_xticks(range(len(groups)), groups, fontsize=8)
    axis.set_title(title, fontsize=10)
    axis.set_ylabel(ylabel)
    if log:
        axis.set_yscale("log")
    axis.legend(fontsize=8)
    axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"plot: {path}")
    return path
