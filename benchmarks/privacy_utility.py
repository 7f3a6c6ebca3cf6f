"""Privacy vs utility: brain-tissue-seg federated over the synthesized sites at several epsilons.

The same federation (4 site daemons on loopback, FedAvg, R = 10 rounds, 40
synthesized subjects per site, the ``site-input-output`` adaptation hook as in
``fl_vs_central.py``) is trained without DP (the anchor: the task's defaults, Adam,
batch 16, 1 local epoch) and with sample-level DP-SGD (Opacus, Poisson sampling,
per-sample clipping at norm C, PRV accountant, delta 1e-5) at each target epsilon.
Every run, the anchor included, starts from the task's public weights
(``init_weights = "public"``: pretrained by ``medfed pretrain`` on Colin27 under
random warps and randomized scanners, no site's data, no privacy cost;
``--init-weights random`` gives the earlier benchmark). Public pretraining is the
standard remedy for DP-SGD's utility loss (Tramèr & Boneh 2021, De et al. 2022): the
private fine-tuning has less to learn. The public set is another brain than the
sites': Colin27, one subject (Debian's mricron-data), against the MNI152 average of
152 subjects that the sites are warps of, and its labels come from another protocol
(a Gaussian mixture on Colin27's own T1, against MNI152's tissue maps); the scanners
differ too. Caveat: the figures below were measured with the earlier public weights,
pretrained on the sites' own MNI152 anatomy (which Tramèr, Kamath & Carlini 2022 warn
against), and are not yet re-measured with the Colin27 weights.
The DP runs use DP's own recipe (``--dp-optimizer``, ``--dp-lr``, ``--dp-average``,
``--dp-batch``, ``--dp-epochs``; measured choices next to ``DP_BATCH`` below): SGD
with momentum at lr 0.5, clipping norm 0.3, batch 256, 1 local epoch, and the moving
average of the iterates (decay 0.5) sent (De et al. 2022 use parameter averaging the
same way).
The run asks for the target epsilon (``privacy.target_epsilon``): each site derives
the smallest noise multiplier that keeps its own epsilon after R rounds at or below
the target (Opacus ``get_noise_multiplier`` on its sampling rate and steps,
``--accountant``), so a site with more data adds less noise; the sites' ledgers charge
and report what was actually spent. ``--shared-noise`` gives every site the noise
the smallest site needs (the earlier recipe).

Why 40 subjects per site (about 1,100-1,500 training slices; the figures of this
paragraph and of the comments below ``CLIP`` are from random weights, with the earlier
recipe: ``--init-weights random --dp-batch 64 --dp-epochs 2 --dp-lr 0.33 --dp-average
0.9``): DP-SGD's noise per
step is fixed by the noise multiplier while the clipped signal grows with the
batch, and at a given epsilon the batch a site can afford grows with its data.
With 10 subjects per site (this benchmark's earlier size; batch 16) epsilon = 8
kept 0.72 of the non-private Dice; 40 subjects is still a small hospital archive.
Twice that (80 subjects, batch 128: the same sampling rate, steps and noise multiplier
for epsilon 8, so half the noise per clipped gradient) kept the same ratio, 0.925
(0.7225 against 0.7808 without DP); at batch 64 (twice the steps, noise 0.74-0.80)
0.7268, ratio 0.931: the non-private model gains from the data almost as much. With
N4 bias correction as well (80 subjects, batch 64): 0.7364 against 0.7848, ratio 0.938,
the best measured, in twice the time per run.

From the public weights (full runs, 2026-12-02, N4 on; a second epsilon-8 run gave
0.7456, 0.952): no DP 0.7828 (0.7657 from random weights), epsilon 1 / 3 / 8 gave
0.7169 / 0.7415 / 0.7453, ratios 0.916 / 0.947 /
0.952 (from random weights: 0.78 / 0.88 / 0.91-0.94). Per site at epsilon 8: 0.784 /
0.732 / 0.713 / 0.753 against 0.823 / 0.774 / 0.752 / 0.782 without DP.
Zero-shot, before any round (the same sites' held-out splits, N4): the public weights
score 0.698 (random weights 0.118), 0.892 of the anchor on their own; from there the
non-private federation adds 0.085 and epsilon-8 DP-SGD 0.047 of it.

Figure per epsilon: the global model's mean Dice over the sites' held-out splits,
and its ratio to the non-private run. Target (issue 4): at epsilon = 8, ratio >= 0.95.

Run: ``python benchmarks/privacy_utility.py [--quick] [--rounds R] [--subjects N]``.
Diagnostics (no BENCH line of their own): ``--epsilons 8`` runs only the targets
named; ``--privacy-unit scan|patient`` protects whole scans or patients instead of
slices (``--dp-batch`` then counts those; at epsilon 8 per scan, batch 4 scans: 0.349
against 0.763); ``--noise-multiplier Z`` adds a DP run at a fixed noise multiplier (e.g.
0.3: how much of the gap is the recipe and how much the noise); ``--adaptation`` picks
another domain-adaptation hook for every run. Each run prints its Dice per site.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from medfed.core import privacy_accounting
from medfed.core.config import RunConfig
from medfed.core.schema import EPSILON_RUN_KEY, NOISE_MULTIPLIER_KEY
from medfed.data.sites import site_sources
from medfed.local import LocalFederation
from medfed.synth import synthesize_sites
from medfed.tasks import dp_units, get_task

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
DP_LR = 0.5
DP_AVERAGE = 0.5
#: Every run, with and without DP, starts from the task's public weights (MNI152 atlas
#: under random scanners, :mod:`medfed.synth.public`; 80 public subjects, 3,000 Adam
#: steps). Zero-shot, before any round, they score 0.66-0.73 per site.
INIT_WEIGHTS = "public"
SUBJECTS = 40
#: Every site corrects its scans' bias field (N4) before preprocessing, as brain tissue
#: pipelines do. Epsilon 8: 0.7107 against 0.7657 without DP, ratio 0.928 (a first
#: version, N4 on a 1 mm grid: 0.7133 / 0.7650, 0.932), against 0.913-0.925 in five
#: runs without it; site-2, the strongest field, 0.675-0.681 against 0.654-0.661. Within
#: a run's spread on the mean, but it lifts the site DP hurt most; kept.
BIAS_CORRECTION = "n4"


def noise_for(
    target: float, sizes: list[int], batch: int, epochs: int, accountant: str = "prv"
) -> float:
    """Smallest noise multiplier keeping every site at or below ``target`` after ``epochs``.

    The sites' own derivation (``privacy_accounting.plan_round`` and
    ``privacy_accounting.noise_for_target``), maximized.
    """
    zs = []
    for n in sizes:
        ((_, rate, steps),) = privacy_accounting.plan_round(
            n, batch_size=batch, epochs=epochs, noise_multiplier=1.0
        )
        zs.append(
            privacy_accounting.noise_for_target(
                target, DELTA, sample_rate=rate, steps=steps, accountant=accountant
            )
        )
    return max(zs)


def run_once(
    root: Path,
    sources: dict,
    rounds: int,
    privacy: dict,
    local_epochs: int = 1,
    adaptation: str = ADAPTATION,
    bias_correction: str = BIAS_CORRECTION,
    init_weights: str = INIT_WEIGHTS,
    **hyper: float | int,
) -> tuple[float, dict[str, float], dict[str, float]]:
    """One federated run: the mean Dice over sites, and each site's epsilon spent and noise."""
    budget = {
        "epsilon_max": 1000.0,
        "delta": DELTA,
        "min_noise_multiplier": 0.0,
        "max_clipping_norm": 10.0,
        "dp_required": False,
    }
    with LocalFederation(root, list(sources), name="pu") as fed:
        fed.create(
            site_data=lambda i, name: {
                **{
                    k: v
                    for k, v in sources[name].model_dump().items()
                    if k in ("kind", "path", "manifest", "cache_dir", "seed", "val_fraction")
                },
                "bias_correction": bias_correction,
            }
        )
        fed.set_budget(**budget)  # a generous budget: the benchmark measures spend
        fed.start(timeout=300)
        folder, summary = fed.run(
            RunConfig(
                task=TASK,
                rounds=rounds,
                local_epochs=local_epochs,
                min_sites=len(sources),
                seed=0,
                privacy=privacy,
                adaptation=adaptation,
                init_weights=init_weights,
                **hyper,
            ),
            timeout=3600,
        )
    if summary.status != "completed":
        raise RuntimeError(f"run failed: {summary}")
    metric = get_task(TASK).primary_metric
    row = json.loads(folder.cross_site_file.read_text())["matrix"]["global"]
    last = [m for m in folder.read_metrics() if m["phase"] == "train" and m["round"] == rounds]
    eps = {m["site"]: m.get(EPSILON_RUN_KEY, 0.0) for m in last}
    noise = {m["site"]: m.get(NOISE_MULTIPLIER_KEY, 0.0) for m in last}
    print(
        f"  {metric} per site: { {s: round(r[metric], 4) for s, r in sorted(row.items())} }",
        flush=True,
    )
    return sum(r[metric] for r in row.values()) / len(row), eps, noise


def main() -> None:
    """Train without DP and at each epsilon; print Dice, ratios and BENCH lines."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--subjects", type=int, default=None)
    parser.add_argument(
        "--dp-batch",
        type=int,
        default=DP_BATCH,
        help="expected DP-SGD batch size (Poisson sampling rate x site size)",
    )
    parser.add_argument("--dp-lr", type=float, default=DP_LR)
    parser.add_argument("--dp-optimizer", default=DP_OPTIMIZER, choices=("adam", "sgd"))
    parser.add_argument(
        "--dp-average",
        type=float,
        default=DP_AVERAGE,
        help="moving-average decay of the DP iterates a site sends (0 = off)",
    )
    parser.add_argument(
        "--dp-epochs", type=int, default=DP_EPOCHS, help="local epochs per round of the DP runs"
    )
    parser.add_argument("--accountant", default=ACCOUNTANT, choices=("rdp", "prv"))
    parser.add_argument(
        "--epsilons",
        default=None,
        help="comma-separated target epsilons (default 1,3,8; --quick: 8)",
    )
    parser.add_argument(
        "--noise-multiplier",
        type=float,
        default=None,
        help="also run the DP recipe at this fixed noise multiplier",
    )
    parser.add_argument(
        "--shared-noise",
        action="store_true",
        help="one noise multiplier for all sites, the smallest site's "
        "(the earlier recipe) instead of each site's own",
    )
    parser.add_argument(
        "--adaptation", default=ADAPTATION, help="domain-adaptation hook of every run"
    )
    parser.add_argument(
        "--bias-correction",
        default=BIAS_CORRECTION,
        choices=("off", "n4"),
        help="the sites' MRI bias-field correction ([data] bias_correction)",
    )
    parser.add_argument(
        "--init-weights",
        default=INIT_WEIGHTS,
        choices=("random", "public"),
        help="every run's starting weights (random: the earlier benchmark)",
    )
    parser.add_argument(
        "--privacy-unit",
        default="sample",
        choices=("sample", "scan", "patient"),
        help="what epsilon protects: one slice, or a whole scan or patient "
        "(then --dp-batch counts those)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (3 if args.quick else 10)
    subjects = args.subjects or (4 if args.quick else SUBJECTS)
    epsilons = (
        [float(e) for e in args.epsilons.split(",")]
        if args.epsilons
        else [8.0]
        if args.quick
        else [1.0, 3.0, 8.0]
    )
    task = get_task(TASK)
    tmp = Path(tempfile.mkdtemp(prefix="medfed-pu-"))
    try:
        synthesize_sites(tmp / "data", sites=4, subjects_per_site=subjects, seed=0)
        sources = site_sources(tmp / "data", seed=0)
        sizes = (
            [
                dp_units.privacy_units(len(d.train), d.train_units, args.privacy_unit)
                for d in map(task.load_site_data, sources.values())
            ]
            if args.shared_noise
            else []
        )
        t0 = time.time()
        plain, _, _ = run_once(
            tmp / "plain",
            sources,
            rounds,
            {},
            adaptation=args.adaptation,
            bias_correction=args.bias_correction,
            init_weights=args.init_weights,
        )
        print(f"no DP: dice {plain:.4f} ({time.time() - t0:.0f} s)", flush=True)
        results = {}
        # (target epsilon, noise): each site derives its own noise from the target, or
        # (--shared-noise, --noise-multiplier) every site adds the noise given.
        runs: list[tuple[float | None, dict[str, float]]] = [
            (
                eps,
                {
                    "noise_multiplier": noise_for(
                        eps, sizes, args.dp_batch, rounds * args.dp_epochs, args.accountant
                    )
                }
                if args.shared_noise
                else {"target_epsilon": eps},
            )
            for eps in epsilons
        ]
        if args.noise_multiplier is not None:
            runs.append((None, {"noise_multiplier": args.noise_multiplier}))
        for i, (eps, noise_asked) in enumerate(runs):
            t0 = time.time()
            dice, spent, noise = run_once(
                tmp / f"dp{i}",
                sources,
                rounds,
                {
                    "mode": "sample",
                    **noise_asked,
                    "max_grad_norm": CLIP,
                    "target_delta": DELTA,
                    "accountant": args.accountant,
                    "optimizer": args.dp_optimizer,
                    "average_iterates": args.dp_average,
                    "unit": args.privacy_unit,
                },
                adaptation=args.adaptation,
                bias_correction=args.bias_correction,
                init_weights=args.init_weights,
                batch_size=args.dp_batch,
                learning_rate=args.dp_lr,
                local_epochs=args.dp_epochs,
            )
            label = f"epsilon {eps:g}" if eps is not None else "fixed noise"
            per_site = lambda d: {s: round(v, 3) for s, v in sorted(d.items())}  # noqa: E731
            print(
                f"{label}: dice {dice:.4f} ({time.time() - t0:.0f} s); noise multiplier "
                f"per site {per_site(noise)}; epsilon spent per site {per_site(spent)}",
                flush=True,
            )
            if eps is not None:
                results[eps] = dice
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for eps, dice in results.items():
        target = " target>=0.95" if eps == 8.0 else ""
        print(
            f"BENCH privacy_utility dice_at_eps{eps:g} value={dice:.4f} anchor={plain:.4f} "
            f"ratio={dice / plain:.4f}{target} unit=dice"
        )


if __name__ == "__main__":
    main()
