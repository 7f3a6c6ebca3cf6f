"""The options `medfed run`, `simulate`, `compare` and `demo` share, defined once.

Each command gives its own defaults in its signature; the name, flag and help of an
option are the same wherever it appears.
"""

from __future__ import annotations

from typing import Annotated

import typer

TaskOpt = Annotated[str, typer.Option(help="task name (`medfed tasks`)")]
StrategyOpt = Annotated[str, typer.Option(help="strategy name (`medfed strategies`)")]
RoundsOpt = Annotated[int, typer.Option(min=1, help="federated rounds")]
StrategyOptionOpt = Annotated[
    list[str] | None,
    typer.Option("--strategy-option", "-o", help="KEY=VALUE for the strategy (repeatable)"),
]
MinSitesOpt = Annotated[int, typer.Option(help="sites needed per round")]
LocalEpochsOpt = Annotated[
    int | None, typer.Option(help="local epochs per round (default: the task's)")
]
BatchSizeOpt = Annotated[int | None, typer.Option(help="local batch size (default: the task's)")]
LrOpt = Annotated[float | None, typer.Option(help="local learning rate (default: the task's)")]
SeedOpt = Annotated[int, typer.Option(help="seed of the initial model")]
RoundTimeoutOpt = Annotated[float, typer.Option(help="seconds to wait for sites")]
NameOpt = Annotated[str, typer.Option(help="a label for the run")]
DpOpt = Annotated[
    str, typer.Option(help="differential privacy: off | sample (DP-SGD) | update (user-level)")
]
NoiseMultiplierOpt = Annotated[
    float | None,
    typer.Option(
        help="DP noise multiplier (default 1.0; with --target-epsilon, a floor, default none)"
    ),
]
TargetEpsilonOpt = Annotated[
    float,
    typer.Option(
        help="DP: each site derives the least noise that keeps its epsilon over the run "
        "at or below this (its data size sets it); 0 = use --noise-multiplier"
    ),
]
MaxGradNormOpt = Annotated[float, typer.Option(help="DP-SGD per-sample clip")]
ClippingNormOpt = Annotated[float, typer.Option(help="update-level DP clip")]
DeltaOpt = Annotated[float, typer.Option(help="DP target delta")]
AccountantOpt = Annotated[str, typer.Option(help="rdp | prv")]
DpOptimizerOpt = Annotated[
    str,
    typer.Option(
        help="DP-SGD optimizer: adam | sgd (momentum 0.9; pair it with --lr 0.33 "
        "at --max-grad-norm 0.3)"
    ),
]
DpAverageOpt = Annotated[
    float,
    typer.Option(
        help="DP-SGD: send the moving average of the iterates with this decay "
        "(e.g. 0.9); 0 = the last iterate"
    ),
]
PrivacyUnitOpt = Annotated[
    str,
    typer.Option(
        help="DP-SGD: what epsilon protects: sample (one training example, a slice "
        "for 2D tasks) | scan (all of a scan's examples) | patient (all of a "
        "patient's scans, by DICOM PatientID); --batch-size then counts units"
    ),
]
SecureAggregationOpt = Annotated[
    str,
    typer.Option(help="default | strict | off (off: the server sees each update; debugging only)"),
]
SecaggThresholdOpt = Annotated[
    int | None,
    typer.Option(
        "--secagg-threshold",
        help="secure aggregation's t: rounds need t + 1 sites, t survivors "
        "unmask a dropped one (default: ceil((n-1)/2) of the n enrolled sites; set it below the "
        "sites a round samples when -o fraction_train < 1)",
    ),
]
DatasetOpt = Annotated[
    str, typer.Option(help="the sites' dataset budget to charge (default: each site's default)")
]
AdaptationOpt = Annotated[
    str,
    typer.Option(
        help="domain-adaptation hook: parameters each site keeps local (`medfed adaptations`)"
    ),
]
AugmentationOpt = Annotated[
    str,
    typer.Option(
        help="site-side training augmentation: 'contrast' remaps half of each site's "
        "training images by a random intensity curve, so one shared model learns every "
        "scanner's contrast (off | contrast)"
    ),
]
HarmonizationOpt = Annotated[
    str,
    typer.Option(
        help="site-side intensity harmonization: 'histogram' maps every scan onto landmarks "
        "the sites agree on before round 1 (refused under DP; under secure aggregation a "
        "site sends its landmarks only with policy.share_landmarks = true); "
        "'histogram-public' onto the task's public landmarks (no site sends any: works "
        "under DP)"
    ),
]
KeepCheckpointsOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="keep the last N rounds' global models in the run folder (the final one "
        "always); 0 keeps every round",
    ),
]
InitFromOpt = Annotated[
    str, typer.Option(help="start from an earlier run's model: RUN_ID (last round) or RUN_ID:ROUND")
]
InitWeightsOpt = Annotated[
    str,
    typer.Option(
        help="random | public: start from the task's weights pretrained on public data "
        "(`medfed tasks` marks the tasks that ship them; no privacy cost)"
    ),
]
TrackOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--track",
        help="when the run ends, log it to an experiment tracker: mlflow[:URI] (default: "
        "sqlite:///mlflow.db here) | tensorboard[:DIR] (default: ./tensorboard); repeatable",
    ),
]
