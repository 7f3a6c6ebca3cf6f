"""Privacy vs utility: brain-tissue-seg federated over synthesized sites, with and without DP.

The protocol (``_protocol.py``, issue 23): per seed (``--seeds``, default 1,2,3) the
sites are synthesized anew (4 sites, one T2-like; ``--subjects`` per site), a seeded
choice of ``--test`` subjects per site is moved out to a test folder that no run reads,
the rest split into train and validation (0.25) at each site. Every arm tries the
recipes of its grid (the same number for every arm: its tuning budget), picks the one
with the best mean validation Dice over sites, and that run alone is scored on the
test subjects, once. Figures are means +- sd over seeds, with the per-site figures.

Arms (FedAvg, R = 10 rounds, the ``site-input-output`` hook in every arm, sites
correcting their bias field with N4, secure aggregation on, medfed's simulation engine:
the deployment's site worker, DP-SGD, ledger and secure aggregation in one process):

- ``no-dp`` (the anchor): no privacy unit; Adam, batch 16, 1 local epoch, lr from
  ``NO_DP_LRS``.
- ``eps8-slice``: sample-level DP-SGD (Opacus, Poisson sampling, per-sample clipping at
  ``CLIP``, PRV accountant, delta 1e-5) at epsilon 8 per slice (each site derives the
  least noise that keeps its own epsilon after R rounds at or below 8); SGD with
  momentum, batch 256, the moving average of the iterates (decay 0.5) sent, lr from
  ``SLICE_LRS``.
- ``eps8-scan``: the same at epsilon 8 per scan (``privacy.unit = "scan"``: a whole
  scan's slices are sampled and clipped together; batch ``SCAN_BATCH`` scans), lr
  from ``SCAN_LRS``.

Every arm starts from the task's public weights (``init_weights = "public"``): trained
by ``medfed pretrain`` on the Colin27 brain (Debian ``mricron-data``; a different
brain, and labels from a different protocol, than the MNI152 template the sites are
warps of) under randomized scanners: no site's data, no privacy cost. The zero-shot
line scores those weights on the test subjects before any round.

Targets (issue 23): eps8-slice >= 0.9 x no-dp; eps8-scan >= 0.8 x no-dp (test split,
mean over sites, mean over seeds). The recipe notes below (``CLIP`` .. ``BIAS_CORRECTION``)
are the probes of earlier sessions, measured on the sites' validation split before it
was separated from the reported one; they fixed the recipe families, whose learning
rates are now chosen on validation.

Seeds: the reported figures come from seeds 1, 2 and 3 (the default); seed 0 is the
development seed, whose test split a one-seed run of 2026-12-06 reported. Seeds 4, 5
and 6 were first read by a confirmation run of 2026-12-07 (``--seeds 4,5,6``: 0.903 and
0.854 of no-dp, zero-shot 0.841), after three runs had read the test splits of 1-3.

Harmonization (``--harmonization``, default ``histogram-public``): every arm's sites
(and the zero-shot line's test scans) map their scans onto the task's public standard
landmarks (the mean landmarks of the public pretraining scans: no site is asked, no
privacy cost), the DP path of histogram standardization. It became the default on
2026-12-07 (a workload change: the earlier figures below ran with ``off``); ``off``
reproduces those.

Workload: 4 sites x ``SUBJECTS`` (20) subjects, 5 per site held out for test, 10 rounds
(about an hour on 2 cores). The BENCH lines name the privacy unit (slice or scan) and
the initial weights (public) in their measure; the anchor is the tuned no-dp arm from
the same public weights.

Run: ``python benchmarks/privacy_utility.py [--quick] [--seeds 1,2,3] [--subjects N]``.
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
    epsilons,
    federated,
    mean_sd,
    overall,
    prepare,
    run_seeds,
    site_mean,
    sources,
    summarize,
)

from medfed.core.config import RunConfig
from medfed.tasks import engine, get_task
from medfed.tasks.harmonization import harmonize
from medfed.tasks.pretrain import load_public_standard, load_public_weights

TASK = "brain-tissue-seg"
ADAPTATION = "site-input-output"
DELTA = 1e-5
#: Every sample's gradient is clipped at 0.3 (their norms are 0.5-1.4 once training is
#: under way), so the noise, z * C, meets a larger share of clipped signal. Full run:
#: epsilon 1 / 3 / 8 gave 0.598 / 0.677 / 0.705 against 0.519 / 0.651 / 0.688 at
#: C = 1 (lr 0.33 against 0.1: the same step length); two more epsilon-8 runs 0.700-0.701.
#: lr 0.66: 0.706 at epsilon 8 (shared noise), but 0.526 at epsilon 1 (per-site noise;
#: 0.598 at lr 0.33): the larger step pays under more noise. One site's data trained alone (site-2,
#: epsilon-8 noise): lr 0.165 / 0.33 / 0.66 / 1.32 / 2.64 gave 0.647 / 0.660 / 0.669 /
#: 0.666 / 0.647; without noise lr 0.66 reached 0.739 against 0.716 at 0.33.
CLIP = 0.3
#: DP runs' recipe, measured at epsilon 8 on this benchmark (10 rounds, mean Dice of the
#: global model; non-private 0.7626 with 40 subjects per site):
#: SGD momentum 0.9, lr 0.1, moving average of the iterates (decay 0.9) sent,
#: batch 64, 1 local epoch: 0.662; the same at lr 0.2: 0.661; batch 128 (lr 0.2,
#: decay 0.8): 0.652; batch 256 (lr 0.4, decay 0.5): 0.628; Adam lr 3e-3: 0.537;
#: batch 64 with 2 local epochs (more steps, more noise per step): 0.690; a UNet of
#: half the width (a quarter of the parameters, so less noise in all): 0.651 (0.743
#: without DP). With 10 subjects per site (batch 16, lr 0.1): 0.553 against 0.714;
#: Adam variants and larger batches were worse there; clipping alone, without noise,
#: 0.723: the loss is the noise. Later (one run each, epsilon 8): batch 128 with 4
#: epochs and PRV (the same steps, 25% less noise per step, twice the compute):
#: 0.698; Adam with epsilon set to the noise's std (lr 3e-3: 0.598, lr 0.015: 0.676);
#: 80 subjects per site, batch 64, 1 epoch: 0.704 against 0.780 without DP, the same
#: 0.90 ratio as 40 subjects (the non-private model gains from the data as much).
#: Where the gap is (one run each, 40 subjects, epsilon 8, C = 1 and lr 0.1 unless
#: said): at a fixed noise multiplier 0.3 (epsilon 152-161) it reaches 0.724, so noise is only
#: part of the gap; the recipe itself does not reach the Adam anchor here. Per site
#: (the FedAvgM run below) 0.748 / 0.654 / 0.673 / 0.681, while one site trained alone with
#: the same DP-SGD (no federation; simulation in one process) reaches 0.754 (site-1)
#: and 0.693 (site-4, T2-like): under this noise, federation gains nothing over
#: local training. Keeping more of the model local helps DP: no hook 0.445,
#: ``site-input-block`` 0.634 (0.738 without DP, ratio 0.86), ``site-input-output``
#: 0.688. No gain from: a cosine decay of lr over rounds (0.687), FedAvgM with server
#: momentum 0.6 (0.693 on the last round's evaluation), weight decay 5e-3 or 2e-2
#: (single-site simulation; the noise inflates the norms of the normalized convs'
#: weights 17 -> 109, an automatic lr decay that weight decay undoes at a cost),
#: or an EMA decay of 0.97 (single-site simulation). Not trained, measured instead:
#: the norm of the batch's clipped mean gradient, relative to C (the signal against a
#: fixed noise). Averaging each sample's gradient over 4 augmentations (flip, shift,
#: scale) before clipping leaves it at 0.51, since per-sample gradients differ across
#: slices, not across augmentations; C = 0.3 (all clipped) raises it by about a fifth;
#: a Dice-only loss by 10-27%, CE-only not at all. C = 0.3 (lr 0.33) was then trained:
#: 0.701 (per site 0.761 / 0.654 / 0.691 / 0.697), the recipe since. With batch 128
#: and 4 epochs as well: 0.709 in 629 s (against 360-375 s), within a run's spread.
#: Where the noise hurts (site-2 trained alone, lr 0.66, C = 0.3, epsilon-8 noise added
#: to some parameters only, a diagnostic without privacy): none 0.739, all 0.669; only on
#: the site-local blocks (11% of the parameters) 0.682, only on the shared body 0.710;
#: only on the input block (5%) 0.708, only on the output block 0.720. The local blocks
#: hold 87-96% of each sample's squared gradient norm, so flat clipping gives the body
#: little signal, yet rebalancing lost: clipping local and shared parts at C / sqrt(2)
#: each 0.652, each tensor at C / sqrt(#tensors) 0.628. Also no gain: a Dice-only loss
#: (0.651; 0.716 without noise), freezing the first block (0.656), a 0.4x or 2.5x lr on
#: the input block (0.658, 0.669), momentum 0.95 (0.666), an EMA decay of 0.97 or 0.99
#: (0.664, 0.613), one continuous 20-epoch call instead of 10 rounds (0.674).
#: Per-site noise from the target (site-1 0.873, site-3 0.905, sites 2 and 4 0.944;
#: every site then spends 7.99 of 8): 0.703 (lr 0.66), within a run's spread of 0.706.
#: Fewer local parameters (a probe hook keeping only the first block and the head local,
#: 1.6 k parameters instead of 22 k): 0.688 against its own non-private 0.736.
#: Batch 32 (lr 0.165, 2 epochs, shared noise 0.790): 0.702, the same as batch 64.
#: The recipe's own ceiling: at noise 0.05 (RDP epsilon about 7e4) it reaches 0.738, so
#: the recipe costs 0.025 and epsilon-8 noise 0.037 more. FedBN with affine instance
#: norms (all else shared): 0.608 without DP (the T2-like site 0.41), not pursued. Site-2
#: alone (lr 0.66, epsilon-8 noise; 0.669 as above): the deepest level frozen at its
#: random init (82 k parameters) 0.669, with its up-convolution too (138 k) 0.665, ReLU
#: 0.670, tanh 0.656, the 0.82 M-parameter wide UNet 0.669 (0.749 without noise): the
#: noise's cost does not follow the number of noised parameters. More compute for the
#: same epsilon (site-2 alone; 360 steps at batch 64 and noise 0.944 give 0.669): batch
#: 128 over 40 epochs (the same 360 steps, noise 1.484) 0.678, batch 256 over 80 (400
#: steps, 2.544) 0.677; twice the steps, batch 64 over 40 epochs (1.15) 0.676, batch 128
#: over 80 (1.956) 0.678: under 0.01 for 2-4x the compute, and it saturates. Depth and
#: norm: residual units per level 0 / 1 (the task) / 2 / 3 gave 0.612 / 0.669 / 0.674 /
#: 0.677 (2 units: 0.747 without noise, the same gap), GroupNorm with 4 groups 0.662, 3
#: levels instead of 4 0.648. Public pretraining that knows nothing of the sites (1,500
#: Adam steps on random smooth 3-class shapes in an ellipse with random contrasts, bias
#: field and noise, no anatomy): 0.664 (0.734 without noise), no gain. Where the gap is
#: (site-2 alone): the task's own non-private recipe (Adam, batch 16, 10 epochs) reaches
#: 0.747, the DP recipe without noise 0.739, with epsilon-8 noise 0.669: the noise, not the
#: recipe, costs the most. Test-time flip averaging (the mean of the softmax of a slice and
#: of its mirror, either in-plane axis): DP 0.669 -> 0.674 / 0.675, non-private 0.747 ->
#: 0.736 / 0.746: under 0.01 on the ratio, not adopted. Clipping the site-local and the
#: shared parameters apart, at C * sqrt(s) and C * sqrt(1 - s) under the same noise (the
#: same epsilon; the shared part's noise is then averaged over four sites, the local
#: part's is not): s = 0.9 gave 0.707 federated, inside flat clipping's spread
#: (0.696-0.709); site-2 alone 0.661 / 0.665 at s = 0.8 / 0.9 against 0.669 flat.
#: Site-2 alone, two more (one run each): fine-tuning only the site-local blocks without
#: noise after DP training, the shared body frozen (personalization that never leaves the
#: site, so epsilon would not cover that site's own model): 1 / 2 / 4 / 8 Adam epochs gave
#: 0.681 / 0.680 / 0.688 / 0.699 from 0.669, but the non-private model gains as much (0.747
#: -> 0.759 / 0.763 / 0.761 / 0.766): ratio 0.896 -> 0.912. Averaging the softmax of the
#: last 2 / 3 / 5 rounds' models: DP 0.669 -> 0.671 / 0.672 / 0.673. Neither adopted.
#: Site-2 alone, four more (one run each, epsilon-8 noise, 0.670 as trained): augmentation
#: multiplicity (De et al. 2022; 4 views per slice, flip and shift, their gradients averaged
#: before clipping, the same epsilon) 0.668 in 3.7x the time (0.727 without noise, against
#: 0.739 unaugmented: the registered slices gain nothing from flips and shifts); training
#: only the shared body after round 5 (the whole clipping norm for it) 0.665; alternating
#: body and site-local rounds 0.650; noise falling over the rounds (z 1.50 -> 0.75
#: geometric, the same PRV epsilon 8) 0.665. Federated (in one process): a 25-parameter
#: per-site intensity map in front of an all-shared UNet, so that no noised block stays
#: local, cannot map the T2-like site (0.28 without DP; mean 0.588), not pursued. The same
#: in-process federation reproduces this benchmark's epsilon-8 run (0.703); averaging the
#: site-local blocks too in the first 2 rounds, as a common start for them: 0.702.
#: Opacus's PRV accountant: a tighter epsilon than RDP for the same noise, so a smaller
#: noise multiplier meets a target (epsilon 8 here: 0.944 against RDP's 0.993). The
#: sites' ledgers charge with the same accountant.
ACCOUNTANT = "prv"
#: From public weights (``INIT_WEIGHTS``) the DP runs take fewer, less noisy steps: batch
#: 256 (q = 0.17-0.23 per site), 1 local epoch per round, so 10 epochs in all at noise
#: about 1.15 (noise per clipped gradient 1.15 / 256 against 0.944 / 64 before).
#: Site-2 trained alone from the public weights, epsilon-8 noise (one run each): batch 64
#: over 20 epochs at lr 0.66 / 0.2 / 0.1 gave 0.671 / 0.686 / 0.704 (0.672 from random
#: weights at lr 0.66); batch 256 over 10 epochs at lr 0.25 / 0.5 / 1.0 gave 0.728 /
#: 0.726 / 0.706 (decay 0.5), over 20 epochs (noise 1.445) 0.710; batch 128 over 10
#: epochs 0.712; batch 512 over 20 0.706. The same site without DP: 0.766 from the
#: public weights, 0.761 from random ones. With only ceil(n / 256) steps per round the
#: momentum builds up less than in one continuous call, hence lr 0.5 here.
DP_BATCH = 256
DP_EPOCHS = 1
DP_OPTIMIZER = "sgd"
DP_AVERAGE = 0.5
#: Every run, with and without DP, starts from the task's public weights (the Colin27
#: brain under random scanners, :mod:`medfed.synth.public`; 80 public subjects, 3,000
#: Adam steps). The figures above were measured from earlier public weights (the MNI152
#: atlas the sites are warps of).
SUBJECTS = 20
#: Every site corrects its scans' bias field (N4) before preprocessing, as brain tissue
#: pipelines do. Epsilon 8: 0.7107 against 0.7657 without DP, ratio 0.928 (a first
#: version, N4 on a 1 mm grid: 0.7133 / 0.7650, 0.932), against 0.913-0.925 in five
#: runs without it; site-2, the strongest field, 0.675-0.681 against 0.654-0.661. Within
#: a run's spread on the mean, but it lifts the site DP hurt most; kept.
BIAS_CORRECTION = "n4"


#: Each arm's tuning grid: two learning rates, chosen on validation. First (2026-12-07,
#: 20 subjects, seeds 1-3) around each recipe's own (the task's 3e-3 for Adam, 0.5 for
#: the DP recipe): no-dp (1e-3, 3e-3), both DP arms (0.25, 0.5). Validation chose an
#: end of its grid in every seed, in every arm: no-dp 3e-3 (0.769 against 0.762),
#: per slice 0.5 (0.680 against 0.673), per scan 0.25 (0.525 against 0.406). So each
#: grid moved one step the way its validation pointed, the same move and the same
#: budget (two runs) for every arm; the earlier winner stays in it. With the moved grids
#: (same command, 63 min) validation chose 3e-3 (no-dp: it beat 1e-3 and 1e-2), 1.0
#: (per slice) and 0.125 (per scan) in every seed: the DP arms still at an end of
#: theirs; test 0.893 and 0.820 of no-dp. So the DP grids moved once more the same way
#: (per slice to (1.0, 2.0), per scan to (0.0625, 0.125)); no-dp's grid, which brackets
#: its choice, stays: every arm still two runs. With these grids and histogram-public
#: harmonization in every arm (2026-12-07, 60 min, seeds 1-3): validation chose 3e-3,
#: 1.0 (now inside its grid) and 0.0625 (again the low end) in every seed; test 0.902
#: and 0.853 of no-dp, the per-scan arm now above the zero-shot weights (0.838).
NO_DP_LRS = (3e-3, 1e-2)
SLICE_LRS = (1.0, 2.0)
SCAN_LRS = (0.0625, 0.125)
#: Scans per expected DP-SGD batch at the per-scan unit (about 256 slices' worth).
SCAN_BATCH = 8
TARGET_EPSILON = 8.0
TARGETS = {"eps8-slice": 0.9, "eps8-scan": 0.8}


def dp_privacy(unit: str) -> dict[str, Any]:
    """The DP arms' privacy section (the target epsilon per ``unit``)."""
    return {
        "mode": "sample",
        "target_epsilon": TARGET_EPSILON,
        "max_grad_norm": CLIP,
        "target_delta": DELTA,
        "accountant": ACCOUNTANT,
        "optimizer": DP_OPTIMIZER,
        "average_iterates": DP_AVERAGE,
        "unit": unit,
    }


def arms(quick: bool) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Each arm's grid: (recipe label, RunConfig fields)."""
    no_dp = [(f"adam lr {lr:g}", {"learning_rate": lr}) for lr in NO_DP_LRS]
    out = {"no-dp": no_dp}
    for unit, batch, lrs in (("sample", DP_BATCH, SLICE_LRS), ("scan", SCAN_BATCH, SCAN_LRS)):
        name = "eps8-slice" if unit == "sample" else "eps8-scan"
        out[name] = [
            (
                f"dp-sgd lr {lr:g} batch {batch}",
                {
                    "learning_rate": lr,
                    "batch_size": batch,
                    "local_epochs": DP_EPOCHS,
                    "privacy": dp_privacy(unit),
                },
            )
            for lr in lrs
        ]
    if quick:  # one recipe each: the plumbing, not a figure
        out = {k: v[-1:] for k, v in out.items()}
    return out


def zero_shot(test: dict, harmonization: str = "off") -> dict[str, float]:
    """The public weights on every site's test subjects, before any round."""
    task = get_task(TASK)
    model = task.build_model()
    engine.set_weights(model, load_public_weights(task))
    out = {}
    for site, src in test.items():
        d = task.load_site_data(src)
        if harmonization == "histogram-public":  # as the runs' sites map them
            d = harmonize(d, load_public_standard(task))
        whole = torch.utils.data.ConcatDataset([d.train, d.val])
        out[site] = engine.evaluate(task, model, whole, device="cpu")["dice"]
    return out


def one_seed(root: Path, seed: int, args: argparse.Namespace) -> dict:
    """Every arm's grid at one seed; each arm's validation choice scored on test."""
    t0 = time.time()
    dev_dir, test_dir = prepare(root, seed, args.subjects, args.test)
    data = {"bias_correction": args.bias_correction}
    dev, test = sources(dev_dir, seed, **data), sources(test_dir, seed, **data)
    print(f"seed {seed}: data in {time.time() - t0:.0f} s", flush=True)
    shot = zero_shot(test, args.harmonization)
    out: dict[str, Any] = {"zero-shot": {"recipe": "public weights", "test": shot}}
    for name, grid in arms(args.quick).items():
        tried: list[Trained] = []
        for label, fields in grid:
            t0 = time.time()
            run = RunConfig(
                task=TASK,
                rounds=args.rounds,
                min_sites=4,
                seed=seed,
                adaptation=ADAPTATION,
                harmonization=args.harmonization,
                init_weights="public",
                **{"local_epochs": 1, **fields},
            )
            tried.append(federated(root / "runs" / name, dev, label, run))
            spent = epsilons(tried[-1].scored, args.rounds)
            print(
                f"  {name:12s} {label}: validation {tried[-1].val_mean:.4f} "
                f"({time.time() - t0:.0f} s); epsilon spent "
                f"{ {s: round(e, 2) for s, e in sorted(spent.items())} }",
                flush=True,
            )
        out[name] = choose_and_test(name, tried, TASK, test)
    return out


def main() -> None:
    """Every seed; the figures, the zero-shot line and the BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 seed, 1 recipe per arm, small")
    parser.add_argument(
        "--seeds", default=None, help="comma-separated (default 1,2,3; 0 is the development seed)"
    )
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--subjects", type=int, default=None, help="per site, test included")
    parser.add_argument("--test", type=int, default=None, help="test subjects per site")
    parser.add_argument(
        "--bias-correction",
        default=BIAS_CORRECTION,
        choices=("off", "n4"),
        help="the sites' MRI bias-field correction ([data] bias_correction)",
    )
    parser.add_argument(
        "--harmonization",
        default="histogram-public",
        choices=("off", "histogram-public"),
        help="every arm's sites map their scans onto the task's public standard landmarks",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--keep", type=Path, default=None, help="keep data and runs here")
    args = parser.parse_args()
    seeds = [int(s) for s in (args.seeds or ("1" if args.quick else "1,2,3")).split(",")]
    args.rounds = args.rounds or (3 if args.quick else 10)
    args.subjects = args.subjects or (8 if args.quick else SUBJECTS)
    args.test = args.test or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    print(
        f"{TASK}: 4 sites x {args.subjects} subjects ({args.test} held out for test), "
        f"{args.rounds} rounds, seeds {seeds}, init public (Colin27), hook {ADAPTATION}, "
        f"bias correction {args.bias_correction}, harmonization {args.harmonization}; grids: "
        + "; ".join(f"{k}: {[r for r, _ in v]}" for k, v in arms(args.quick).items())
    )
    results = run_seeds(seeds, lambda root, s: one_seed(root, s, args), args.keep, "pu")
    summarize(results, "no-dp")
    anchor = arm_mean(results, "no-dp")
    zs = arm_mean(results, "zero-shot")
    zs_sites = {
        x: round(site_mean(results, "zero-shot", x), 4) for x in results[seeds[0]]["no-dp"]["test"]
    }
    spread = mean_sd([overall(results[s]["zero-shot"]) for s in seeds])
    print(
        f"zero-shot (public weights, before any round): {spread}, {zs / anchor:.3f} "
        f"of no-dp; per site {zs_sites}"
    )
    for arm, target in TARGETS.items():
        value = arm_mean(results, arm)
        print(
            f"BENCH privacy_utility dice_{arm}_public-init value={value:.4f} anchor={anchor:.4f} "
            f"ratio={value / anchor:.4f} target>={target} unit=dice"
        )


if __name__ == "__main__":
    main()
