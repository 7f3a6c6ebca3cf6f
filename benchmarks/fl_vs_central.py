"""Federated vs pooled quality: ONE shared model, three splits, three seeds, equal tuning.

The synthesized multi-site brain MRI benchmark (4 sites, one of them T2-weighted: CSF
bright, WM dark), brain-tissue-seg, mean Dice (CSF, GM, WM). For each seed:

1. ``medfed data synth`` writes the sites (seed-dependent subjects); a seeded choice of
   ``--test`` subjects per site is moved out to a test folder
   (:func:`medfed.synth.holdout.hold_out_test`): no run, no baseline and no recipe
   choice reads them. The rest split into train and validation at each site
   (``val_fraction`` 0.25, seeded).
2. Every arm is trained once per learning rate of the same grid (``--lrs``, the task's
   default among them): the same tuning budget for all, and the pooled anchor at
   each rate with and without the shared arm's contrast randomization. Each arm's learning rate is
   chosen by its mean validation Dice over sites; the chosen model alone is scored on
   the test subjects, once.

Arms (the same epochs of data: R = 20 rounds of 1 local epoch, or R epochs pooled):

- ``pooled`` (the anchor): plain PyTorch on the union of the sites' training splits
  (:func:`medfed.tasks.baseline.run_baseline`), one model, no site-specific parts.
- ``fedavg``: medfed FedAvg, no hook: the baseline it is.
- ``shared``: ONE global model (no site-local parameters), FedAvg with contrast
  randomization at the sites (``--augmentation contrast``, :data:`SHARED`,
  :mod:`medfed.tasks.augmentation`): half of each site's training images remapped by
  a random intensity curve, so no site's update pulls the model towards its own
  scanner's contrast. The pooled anchor's grid has the same option: it trains with
  and without contrast randomization (the same transform, seeded per site) at every
  learning rate, and validation picks (:data:`POOLED_AUGMENTATION`; before
  2026-12-06 late it trained without it only).
- ``personal``: FedAvg with the ``site-input-output`` hook (each site keeps its first
  block and prediction head), against its own anchor ``pooled-site``: pooled training
  of the same shape (:mod:`medfed.tasks.site_specific`: one model per site, the shared
  parameters tied, the same blocks per site), so that both have the same
  site-specific capacity.
- diagnostics (``--arms``): ``scaffold-hist`` (SCAFFOLD with histogram harmonization),
  ``shared-hist`` (contrast randomization with histogram harmonization) and
  ``shared-m`` (contrast randomization under FedAvgM, server momentum 0.5).

Federated arms run in medfed's simulation engine (``medfed.local.simulation``: the
deployment's ServerApp, ClientApp edges, site worker and secure aggregation, the sites
in this process; a test checks it gives the deployment's model), secure aggregation on
(default mode; the simulated sites allow their landmarks for harmonized diagnostics).
Privacy unit: none (no DP). Initial weights: the task's public weights for every arm,
the anchors included (``medfed pretrain`` on the Colin27 brain under randomized
scanners: no site's data; ``--init-weights random`` for seeded random weights).

Rounds: 20 (``ROUNDS``; the pooled anchor trains 20 epochs), chosen on seed 0's
validation split (2026-12-06, lr 3e-3): at 10 rounds pooled 0.7419, shared 0.6953
(0.937); at 20 rounds pooled 0.7429, shared 0.7039 (0.948): pooled training has
levelled off by 10 epochs, FedAvg (one site's epoch of steps per round, averaged) has
not. Until then the benchmark ran 10 rounds (3 seeds: shared 0.943 of pooled). Server
momentum (FedAvgM, validation at 10 rounds): 0.5 0.6994, 0.7 0.6967, 0.9 0.6903, none
0.6953; server learning rate 2 without momentum 0.6395; at 20 rounds momentum 0.5
0.7071 against 0.7039: within the seeds' spread, so the shared arm stays plain FedAvg.
A learning rate of 1e-2 raises pooled validation (0.7503) and lowers the shared arm's
(0.6689): the grid stays {1e-3, 3e-3} for all.

Measured while choosing the shared arm's hook (seed 0, lr 3e-3, 10 rounds, 2026-12-06;
test mean Dice, site-4 is the T2-like site): from random weights pooled 0.718 (site-4
0.702), FedAvg 0.515 (0.239), SCAFFOLD with histogram harmonization 0.558 (0.219),
contrast randomization 0.519 (0.414), with harmonization too 0.528 (0.396); from the
public weights pooled 0.748 (0.747), FedAvg 0.696 (0.618), contrast randomization
0.706 (0.696).

Figures: per arm, the test mean Dice over sites (mean +- sd over seeds) and its ratio
to its anchor's; the worst site: the arm's and the anchor's test Dice there (means
over seeds) at the site where the arm's ratio is lowest. Targets (issue 23): shared
>= 0.95 x pooled, worst site >= 0.9 x; fedavg is printed against the same targets;
personal >= 0.99 x pooled-site.

Seeds: the reported figures come from seeds 1, 2 and 3 (the default), whose test
splits no choice looked at. Seed 0 is the development seed: the hook, the rounds and
the probes above were chosen on it, and its test split was read while choosing the hook.

Run: ``python benchmarks/fl_vs_central.py [--quick] [--seeds 1,2,3] [--rounds R]``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from _protocol import (
    Trained,
    arm_mean,
    choose_and_test,
    federated,
    prepare,
    run_seeds,
    site_mean,
    sources,
    summarize,
)
from torch.utils.data import ConcatDataset

from medfed.core.config import RunConfig
from medfed.tasks import engine, get_task
from medfed.tasks.augmentation import contrast_randomized
from medfed.tasks.baseline import train_model
from medfed.tasks.pretrain import initial_weights
from medfed.tasks.site_specific import train_site_specific

TASK = "brain-tissue-seg"
#: The shared-model arm's hooks (RunConfig fields); SCAFFOLD's local steps are set per
#: run to one epoch of the median site (:func:`one_epoch_steps`).
SHARED: dict[str, Any] = {"strategy": "fedavg", "augmentation": "contrast"}
ARMS: dict[str, dict[str, Any] | None] = {
    "pooled": None,
    "fedavg": {"strategy": "fedavg"},
    "shared": SHARED,
    # Diagnostics (--arms): the other hooks for one shared model, alone and together.
    "scaffold-hist": {"strategy": "scaffold", "harmonization": "histogram"},
    "shared-hist": {**SHARED, "harmonization": "histogram"},
    "shared-m": {  # FedAvgM: the server's update with momentum
        **SHARED,
        "strategy": "fedavgm",
        "strategy_options": {"server_momentum": 0.5, "server_learning_rate": 1.0},
    },
    "pooled-site": None,
    "personal": {"strategy": "fedavg", "adaptation": "site-input-output"},
}
#: The pooled anchor's recipe options beside the learning rate: the shared arm's hook,
#: contrast randomization, is in its grid too (chosen on validation like the rate).
POOLED_AUGMENTATION = ("none", "contrast")
ANCHOR = {"fedavg": "pooled", "shared": "pooled", "personal": "pooled-site"}
TARGET = {"fedavg": 0.95, "shared": 0.95, "personal": 0.99}
#: Rounds of one local epoch (pooled: as many epochs); chosen on seed 0's validation
#: split (see the module's docstring).
ROUNDS = 20


def one_epoch_steps(sites: dict, batch: int) -> int:
    """Optimizer steps of one local epoch at the median site."""
    sizes = sorted(len(d.train) for d in sites.values())
    return max(1, -(-sizes[len(sizes) // 2] // batch))


def pooled(
    arm: str, sites: dict, lr: float, args: argparse.Namespace, seed: int, augmentation: str
) -> Trained:
    """Pooled training (one model, or one per site with tied shared parameters).

    ``augmentation`` "contrast": each site's training images contrast-randomized as
    that site's worker does it (a fresh curve per fetch, so per epoch), seeded per site.
    """
    task = get_task(TASK)
    device = engine.select_device()
    hp = dict(
        epochs=args.rounds, batch_size=task.defaults.batch_size, learning_rate=lr, device=device
    )
    init = (
        initial_weights(task, seed=seed, init="public") if args.init_weights == "public" else None
    )
    if arm == "pooled-site":
        models = train_site_specific(task, sites, "site-input-output", seed=seed, init=init, **hp)
    else:
        train = [
            contrast_randomized(d, seed=seed * 1000 + i).train
            if augmentation == "contrast"
            else d.train
            for i, d in enumerate(sites.values())
        ]
        model = train_model(task, ConcatDataset(train), seed=seed, init=init, **hp)
        models = dict.fromkeys(sites, model)
    val = [engine.evaluate(task, models[s], d.val, device=device)["dice"] for s, d in sites.items()]
    label = f"lr {lr:g}" + (" contrast" if augmentation == "contrast" else "")
    return Trained(label, sum(val) / len(val), models.__getitem__)


def one_seed(root: Path, seed: int, args: argparse.Namespace) -> dict:
    """Every arm at every learning rate; each arm's validation choice scored on test."""
    t0 = time.time()
    dev_dir, test_dir = prepare(root, seed, args.subjects, args.test)
    dev, test = sources(dev_dir, seed), sources(test_dir, seed)
    task = get_task(TASK)
    sites = {n: task.load_site_data(s) for n, s in dev.items()}
    steps = one_epoch_steps(sites, task.defaults.batch_size)
    print(f"seed {seed}: data in {time.time() - t0:.0f} s; one local epoch = {steps} steps")
    out = {}
    for name, arm in ARMS.items():
        if name not in args.arms:
            continue
        tried = []
        recipes = [
            (lr, aug)
            for lr in args.lrs
            for aug in (POOLED_AUGMENTATION if name == "pooled" else ("none",))
        ]
        for lr, aug in recipes:
            t0 = time.time()
            if arm is None:
                tried.append(pooled(name, sites, lr, args, seed, aug))
            else:
                options = dict(arm.get("strategy_options", {}))
                if arm["strategy"] == "scaffold":
                    options["local_steps"] = steps
                hooks = {k: v for k, v in arm.items() if k != "strategy_options"}
                run = RunConfig(
                    task=TASK,
                    rounds=args.rounds,
                    local_epochs=1,
                    learning_rate=lr,
                    min_sites=4,
                    seed=seed,
                    init_weights=args.init_weights,
                    strategy_options=options,
                    **hooks,
                )
                tried.append(federated(root / "runs" / name, dev, f"lr {lr:g}", run))
            print(
                f"  {name:12s} {tried[-1].recipe}: validation {tried[-1].val_mean:.4f} "
                f"({time.time() - t0:.0f} s)",
                flush=True,
            )
        out[name] = choose_and_test(name, tried, TASK, test)
    return out


def report(results: dict[int, dict]) -> None:
    """Mean +- sd over seeds per arm, then the BENCH lines."""
    summarize(results, "pooled")
    sites = sorted(next(iter(results.values()))["pooled"]["test"])
    lines = []
    for arm, anchor in ANCHOR.items():
        if arm not in results[min(results)] or anchor not in results[min(results)]:
            continue
        value, ref = arm_mean(results, arm), arm_mean(results, anchor)
        lines.append(
            f"BENCH fl_vs_central {arm}_mean_dice value={value:.4f} anchor={ref:.4f} "
            f"ratio={value / ref:.4f} target>={TARGET[arm]} unit=dice"
        )
        if arm == "personal":
            continue
        worst = min(sites, key=lambda x: site_mean(results, arm, x) / site_mean(results, anchor, x))
        w_val, w_ref = site_mean(results, arm, worst), site_mean(results, anchor, worst)
        print(f"  {arm}: worst site {worst}")
        lines.append(
            f"BENCH fl_vs_central {arm}_worst_site_dice value={w_val:.4f} "
            f"anchor={w_ref:.4f} ratio={w_val / w_ref:.4f} target>=0.9 unit=dice"
        )
    print("\n".join(lines))


def main() -> None:
    """Parse the options, run every seed, print the figures and the BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, fewer subjects and rounds")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated (default 1,2,3; 0 is the development seed)"
    )
    parser.add_argument("--rounds", type=int, default=None, help="rounds = pooled epochs")
    parser.add_argument("--subjects", type=int, default=None, help="per site, test included")
    parser.add_argument("--test", type=int, default=None, help="test subjects per site")
    parser.add_argument("--lrs", default="0.001,0.003", help="the learning-rate grid")
    parser.add_argument(
        "--init-weights",
        default="public",
        choices=("random", "public"),
        help="every arm's start, the anchors' included (public: the task's public weights)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (all arms)")
    parser.add_argument(
        "--arms",
        default="pooled,fedavg,shared,pooled-site,personal",
        help=f"comma-separated, of {','.join(ARMS)}",
    )
    parser.add_argument("--keep", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3")).split(",")]
    args.rounds = args.rounds or (3 if args.quick else ROUNDS)
    args.subjects = args.subjects or (6 if args.quick else 12)
    args.test = args.test or (2 if args.quick else 3)
    args.lrs = [float(x) for x in args.lrs.split(",")]
    args.arms = args.arms.split(",")
    unknown = set(args.arms) - set(ARMS)
    if unknown or "pooled" not in args.arms:
        parser.error(f"--arms: unknown {sorted(unknown)} or no pooled; of {sorted(ARMS)}")
    torch.set_num_threads(args.threads)
    print(
        f"{TASK}: 4 sites x {args.subjects} subjects ({args.test} held out for test), "
        f"{args.rounds} rounds/epochs, lr grid {args.lrs}, seeds {seeds}, "
        f"init {args.init_weights}, privacy unit none (no DP), shared arm {SHARED}"
    )
    results = run_seeds(seeds, lambda root, s: one_seed(root, s, args), args.keep, "flvc")
    report(results)


if __name__ == "__main__":
    main()
