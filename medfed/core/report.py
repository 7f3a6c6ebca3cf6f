"""Plots and tables made from a run folder's metrics.jsonl."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Any

from medfed.core.schema import EPSILON_RUN_KEY


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
    if any(EPSILON_RUN_KEY in row for row in metrics):
        panels.append((EPSILON_RUN_KEY, "train"))
    return panels


#: Beyond this many sites a panel draws them as one grey bundle with their median, not
#: a labelled line each (a many-site simulation would have a legend of hundreds).
LABELLED_SITES_MAX = 10

#: One line of a panel: legend label (None: no entry), rounds, values, matplotlib style.
Line = tuple[str | None, list[int], list[float], dict[str, Any]]


def panel_lines(series: dict[str, list[tuple[int, float]]]) -> list[Line]:
    """What one panel draws: a labelled line per site, or many sites as a bundle.

    The global model (site ``global``) is always its own thick black line.
    """
    lines: list[Line] = []
    sites = {k: v for k, v in series.items() if k != "global"}
    many = len(sites) > LABELLED_SITES_MAX
    by_round: dict[int, list[float]] = defaultdict(list)
    for i, (site, points) in enumerate(sites.items()):
        xs, ys = (list(t) for t in zip(*points, strict=True))
        if not many:
            lines.append((site, xs, ys, {"marker": "o"}))
            continue
        lines.append(
            (
                f"{len(sites)} sites" if i == 0 else None,
                xs,
                ys,
                {"color": "0.6", "linewidth": 0.6, "alpha": 0.4},
            )
        )
        for x, y in points:
            by_round[x].append(y)
    if many:
        rounds = sorted(by_round)
        lines.append(
            (
                "site median",
                rounds,
                [float(median(by_round[r])) for r in rounds],
                {"color": "tab:blue", "linestyle": "--", "marker": "o"},
            )
        )
    if "global" in series:
        xs, ys = (list(t) for t in zip(*series["global"], strict=True))
        lines.append(("global", xs, ys, {"color": "black", "linewidth": 2.5, "marker": "o"}))
    return lines


def plot_metrics(metrics: list[dict[str, Any]], metric: str, out: Path, *, title: str) -> Path:
    """Plot ``metric`` per site per round, the training loss or, in DP runs, epsilon (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = plot_panels(metrics, metric)
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (name, phase) in zip(axes[0], panels, strict=True):
        for label, xs, ys, style in panel_lines(per_site_series(metrics, name, phase)):
            ax.plot(xs, ys, label=label if label is not None else "_nolegend_", **style)
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
