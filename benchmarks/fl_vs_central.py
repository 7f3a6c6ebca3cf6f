"""Federated vs centralized quality on the synthesized multi-site brain MRI benchmark.

Same data, same model, same budget of epochs:

- anchor: centralized training (plain PyTorch on the pooled training splits of the
  4 sites) for E epochs;
- value: medfed, FedAvg over 4 real site daemons on loopback (TLS), E rounds of 1
  local epoch each, so every training example is seen E times in both.

Both final models are scored on every site's held-out split (the same subject split
in both); the figure is the mean over sites of the task's Dice (CSF, GM, WM mean).
Target (issue 3): ratio federated / centralized >= 0.99 (Sheller et al. 2018 report
0.852 vs 0.862 = 0.988 on BraTS).

Run: ``python benchmarks/fl_vs_central.py [--quick] [--epochs E]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from medfed.core.config import RunConfig
from medfed.data.sites import site_sources
from medfed.local import LocalFederation
from medfed.synth import synthesize_sites
from medfed.tasks import engine, get_task
from medfed.tasks.baseline import mean_over_sites, run_baseline

TASK = "brain-tissue-seg"


def centralized(sources: dict, epochs: int) -> tuple[float, dict]:
    """Pooled training; returns the mean Dice over sites and the per-site row."""
    task = get_task(TASK)
    torch.set_num_threads(2)
    sites = {name: task.load_site_data(src) for name, src in sources.items()}
    result = run_baseline(task, sites, "centralized", epochs=epochs,
                          device=engine.select_device(), seed=0)
    row = {s: m[task.primary_metric] for s, m in result.matrix["centralized"].items()}
    return mean_over_sites(result.matrix, task.primary_metric)["centralized"], row


def federated(root: Path, sources: dict, epochs: int) -> tuple[float, dict, dict]:
    """FedAvg over real site daemons; returns mean Dice over sites, the row, the summary."""
    names = list(sources)
    with LocalFederation(root, names, name="bench") as fed:
        fed.create(site_data=lambda i, name: {
            k: v for k, v in sources[name].model_dump().items()
            if k in ("kind", "path", "manifest", "cache_dir", "seed", "val_fraction")})
        fed.start(timeout=300)
        folder, summary = fed.run(RunConfig(task=TASK, rounds=epochs, local_epochs=1,
                                            min_sites=len(names), seed=0), timeout=3600)
    if summary.get("status") != "completed":
        raise RuntimeError(f"federated run failed: {summary}")
    matrix = json.loads(folder.cross_site_file.read_text())["matrix"]
    metric = get_task(TASK).primary_metric
    row = {s: m[metric] for s, m in matrix["global"].items()}
    return sum(row.values()) / len(row), row, summary


def main() -> None:
    """Synthesize the sites, train both ways, print per-site Dice and the BENCH line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer subjects and epochs")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--subjects", type=int, default=None)
    args = parser.parse_args()
    epochs = args.epochs or (3 if args.quick else 20)
    subjects = args.subjects or (4 if args.quick else 10)
    tmp = Path(tempfile.mkdtemp(prefix="medfed-flvc-"))
    try:
        t0 = time.time()
        synthesize_sites(tmp / "data", sites=4, subjects_per_site=subjects, seed=0)
        sources = site_sources(tmp / "data", seed=0)
        print(f"synthesized 4 sites x {subjects} subjects in {time.time() - t0:.1f} s")
        t0 = time.time()
        c_mean, c_row = centralized(sources, epochs)
        print(f"centralized: {epochs} epochs in {time.time() - t0:.0f} s; dice per site {c_row}")
        t0 = time.time()
        f_mean, f_row, summary = federated(tmp / "fed", sources, epochs)
        print(f"federated:   {epochs} rounds x 1 local epoch in {time.time() - t0:.0f} s "
              f"(median round {sorted(summary['round_seconds'].values())[epochs // 2]:.1f} s); "
              f"dice per site {f_row}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"mean dice over sites: federated {f_mean:.4f}, centralized {c_mean:.4f}")
    print(f"BENCH fl_vs_central mean_dice value={f_mean:.4f} anchor={c_mean:.4f} "
          f"ratio={f_mean / c_mean:.4f} target>=0.99 unit=dice")


if __name__ == "__main__":
    main()
