"""Plots and tables made from a run folder's metrics.jsonl."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any


def per_site_series(
    metrics: list[dict[str, Any]], metric: str, phase: str = "evaluate"
) -> dict[str, list[tuple[int, float]]]:
    """``{site: [(round, value), ...]}`` for one metric and phase."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in metrics:
        if row.get("phase") == phase and metric in row:
            series[row["site"]].append((int(row["round"]), float(row[metric])))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_panels(metrics: list[dict[str, Any]], metric: str) -> list[tuple[str, str]]:
    """The (metric, phase) panels of the run plot: the sites' scores, then what was sent.

    Sites send no training loss under DP (epsilon does not cover it), so DP runs have
    no such panel; they have epsilon spent by each site so far instead.
    """
    panels = [(metric, "evaluate")]
    if any("train-loss" in row for row in metrics):
        panels.append(("train-loss", "train"))
    if any("epsilon-run" in row for row in metrics):
        panels.append(("epsilon-run", "train"))
    return panels


def plot_metrics(metrics: list[dict[str, Any]], metric: str, out: Path, *, title: str) -> Path:
    """Plot ``metric`` per site per round, the training loss or, in DP runs, epsilon (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = plot_panels(metrics, metric)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, phase) in zip(axes[0], panels, strict=True):
        for site, points in per_site_series(metrics, name, phase).items():
            xs, ys = zip(*points, strict=True)
            style = {"color": "black", "linewidth": 2.5} if site == "global" else {}
            ax.plot(xs, ys, marker="o", label=site, **style)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(f"{name} ({phase})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
