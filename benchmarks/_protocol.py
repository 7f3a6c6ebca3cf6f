"""The evaluation protocol of the learning benchmarks (not a benchmark itself).

Three splits per site: a seeded choice of subjects moved out to a test folder
(:func:`medfed.synth.holdout.hold_out_test`) that no run, baseline or recipe choice
reads; the rest split into train and validation by the site's data source. Every arm
is trained once per recipe of the same grid; its recipe is chosen by the mean
validation Dice over sites (``cross_site.json``); the chosen model alone is scored on
the test subjects, once. Everything over several seeds (data, split, model init,
training), reported as mean +- sd with the per-site figures.

Federated runs go through medfed's simulation engine (:mod:`medfed.local.simulation`):
the deployment's ServerApp, ClientApp edges, site worker, DP and secure aggregation,
the sites in this process (a test checks it gives the deployment's model).
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from medfed.core.config import DataSourceConfig, RunConfig
from medfed.core.runs import RunFolder
from medfed.core.schema import EPSILON_RUN_KEY
from medfed.data.sites import site_sources
from medfed.local.held_out import score_on_test
from medfed.local.sim_sites import SimSite
from medfed.local.simulation import SIMULATION_BUDGET, simulate
from medfed.synth import synthesize_sites
from medfed.synth.holdout import hold_out_test
from medfed.tasks import engine, get_task

METRIC = "dice"
#: The simulated sites allow what a harmonized run needs: their intensity landmarks
#: (11 numbers and a scan count) in the clear, beside secure aggregation. A deployed
#: site's operator chooses this in site.toml (``policy.share_landmarks``).
SITE_POLICY = {"share_landmarks": True}


@dataclass
class Trained:
    """One arm at one seed and recipe: its validation mean, and what the test scores."""

    recipe: str
    val_mean: float
    scored: Any  # a run folder (Path), or a callable site -> model


def prepare(root: Path, seed: int, subjects: int, test: int) -> tuple[Path, Path]:
    """Synthesize 4 sites for ``seed``; move ``test`` subjects per site to ``root/test``."""
    synthesize_sites(root / "dev", sites=4, subjects_per_site=subjects, seed=seed)
    (root / "dev" / "synth.json").unlink()  # only site folders below dev/
    hold_out_test(root / "dev", root / "test", per_site=test, seed=seed)
    return root / "dev", root / "test"


def sources(folder: Path, seed: int, **data: Any) -> dict[str, DataSourceConfig]:
    """The site folders' data sources, split by ``seed``, with ``data`` overrides."""
    return {
        n: s.model_copy(update=data) if data else s
        for n, s in site_sources(folder, seed=seed).items()
    }


def federated(runs: Path, dev: dict[str, DataSourceConfig], recipe: str, run: RunConfig) -> Trained:
    """One simulated federated run; its validation mean over sites from cross_site.json."""
    sites = [SimSite(n, s) for n, s in dev.items()]
    folder, summary = simulate(
        run, sites, runs, workers=1, budget=SIMULATION_BUDGET, policy=SITE_POLICY
    )
    if not summary.completed:
        raise RuntimeError(f"federated run failed: {summary.status} {summary.reason}")
    row = json.loads(folder.cross_site_file.read_text())["matrix"]["global"]
    return Trained(recipe, sum(m[METRIC] for m in row.values()) / len(row), folder.path)


def epsilons(run_dir: Path, rounds: int) -> dict[str, float]:
    """Each site's epsilon spent over the run (its last training round's report)."""
    last = RunFolder(run_dir).read_metrics()
    return {
        m["site"]: float(m.get(EPSILON_RUN_KEY, 0.0))
        for m in last
        if m["phase"] == "train" and m["round"] == rounds
    }


def run_seeds(
    seeds: list[int],
    one_seed: Callable[[Path, int], dict[str, Any]],
    keep: Path | None,
    name: str,
) -> dict[int, dict[str, Any]]:
    """``one_seed(root, seed)`` for every seed, in a temporary folder unless ``keep``."""
    root = keep or Path(tempfile.mkdtemp(prefix=f"medfed-{name}-"))
    t0 = time.time()
    try:
        results = {s: one_seed(root / f"seed-{s}", s) for s in seeds}
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    print(f"all seeds in {time.time() - t0:.0f} s")
    return results


def test_scores(
    task_name: str, trained: Trained, test: dict[str, DataSourceConfig]
) -> dict[str, float]:
    """The chosen model's test Dice per site: the one time the test split is read."""
    if isinstance(trained.scored, Path):
        scores = score_on_test(trained.scored, test, device=torch.device("cpu"))
        return {s: m[METRIC] for s, m in scores.items()}
    model_of: Callable[[str], nn.Module] = trained.scored
    task = get_task(task_name)
    out = {}
    for site, src in test.items():
        d = task.load_site_data(src)
        out[site] = engine.evaluate(
            task, model_of(site), ConcatDataset([d.train, d.val]), device="cpu"
        )[METRIC]
    return out


def choose_and_test(
    name: str, tried: list[Trained], task_name: str, test: dict[str, DataSourceConfig]
) -> dict[str, Any]:
    """The recipe with the best validation mean, scored on test; printed."""
    best = max(tried, key=lambda t: t.val_mean)
    row = test_scores(task_name, best, test)
    print(
        f"  {name:12s} chose {best.recipe}: test "
        + " ".join(f"{s} {v:.4f}" for s, v in sorted(row.items())),
        flush=True,
    )
    return {"recipe": best.recipe, "val": best.val_mean, "test": row, "trained": best}


def mean_sd(values: list[float]) -> str:
    """``mean +- sd`` (sd 0 for one value)."""
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} +- {sd:.4f}"


def overall(result: dict[str, Any]) -> float:
    """An arm's test mean over sites (each site counts once)."""
    return sum(result["test"].values()) / len(result["test"])


def summarize(results: dict[int, dict[str, dict]], anchor: str) -> None:
    """Per arm: test mean over sites (mean +- sd over seeds), ratio, per-site means."""
    seeds = sorted(results)
    sites = sorted(results[seeds[0]][anchor]["test"])
    print(f"\ntest mean Dice over sites, {len(seeds)} seed(s), mean +- sd over seeds:")
    for arm in results[seeds[0]]:
        per_seed = [overall(results[s][arm]) for s in seeds]
        ratios = [overall(results[s][arm]) / overall(results[s][anchor]) for s in seeds]
        print(
            f"  {arm:12s} {mean_sd(per_seed)}  ratio to {anchor} {mean_sd(ratios)}; recipes "
            f"{[results[s][arm]['recipe'] for s in seeds]}; per site "
            + " ".join(f"{x} {site_mean(results, arm, x):.4f}" for x in sites)
        )


def site_mean(results: dict[int, dict[str, dict]], arm: str, site: str) -> float:
    """An arm's test Dice at ``site``, mean over seeds."""
    return statistics.mean(results[s][arm]["test"][site] for s in results)


def arm_mean(results: dict[int, dict[str, dict]], arm: str) -> float:
    """An arm's test mean over sites, mean over seeds."""
    return statistics.mean(overall(results[s][arm]) for s in results)
