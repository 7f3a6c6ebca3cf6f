"""`medfed simulate`: a run over N simulated sites on this machine (medfed.local.simulation)."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.main import console, interrupt_on_signal
from medfed.cli.options import (
    AccountantOpt,
    AdaptationOpt,
    AugmentationOpt,
    BatchSizeOpt,
    ClippingNormOpt,
    DatasetOpt,
    DeltaOpt,
    DpAverageOpt,
    DpOpt,
    DpOptimizerOpt,
    HarmonizationOpt,
    InitFromOpt,
    InitWeightsOpt,
    KeepCheckpointsOpt,
    LocalEpochsOpt,
    LrOpt,
    MaxGradNormOpt,
    MinSitesOpt,
    NameOpt,
    NoiseMultiplierOpt,
    PrivacyUnitOpt,
    RoundsOpt,
    RoundTimeoutOpt,
    SecaggThresholdOpt,
    SecureAggregationOpt,
    SeedOpt,
    StrategyOpt,
    StrategyOptionOpt,
    TargetEpsilonOpt,
    TaskOpt,
    TrackOpt,
)
from medfed.cli.progress import ProgressView
from medfed.cli.run_cmd import (
    build_run_config,
    log_to_trackers,
    parse_option,
    parse_trackers,
    print_summary,
)
from medfed.core.errors import ConfigError

#: What ``--partition`` may be: each site's data as it is, or a pooled dataset shared out.
PARTITIONS = ("none", "iid", "dirichlet")
#: Simulated sites train one after another: a round takes the sum of their times.
SIMULATION_ROUND_TIMEOUT = 86_400.0


def register(app: typer.Typer) -> None:
    """Add the simulate command."""

    @app.command("simulate")
    def simulate(
        task: TaskOpt,
        strategy: StrategyOpt = "fedavg",
        sites: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="number of simulated sites (default: 3, or as many as --data has "
                "site folders)",
            ),
        ] = None,
        rounds: RoundsOpt = 3,
        strategy_option: StrategyOptionOpt = None,
        min_sites: MinSitesOpt = 2,
        data: Annotated[
            Path | None,
            typer.Option(
                help="a `medfed data synth` output: its site folders are the sites (or, with "
                "--partition, its subjects are shared out); default: generated data per "
                "site, as `medfed demo` sites have"
            ),
        ] = None,
        partition: Annotated[
            str,
            typer.Option(
                help="none (each site's data as it is) | iid | dirichlet: pool the subjects of "
                "--data and share them out among --sites sites"
            ),
        ] = "none",
        partition_by: Annotated[
            str,
            typer.Option(help="dirichlet: skew the sites' mix of label (lesion or not) | scanner"),
        ] = "label",
        alpha: Annotated[
            float,
            typer.Option(
                help="dirichlet concentration: small (0.1) skews, large (100) is close to IID"
            ),
        ] = 0.5,
        local_epochs: LocalEpochsOpt = None,
        batch_size: BatchSizeOpt = None,
        lr: LrOpt = None,
        seed: SeedOpt = 0,
        round_timeout: RoundTimeoutOpt = SIMULATION_ROUND_TIMEOUT,
        name: NameOpt = "",
        dp: DpOpt = "off",
        noise_multiplier: NoiseMultiplierOpt = None,
        target_epsilon: TargetEpsilonOpt = 0.0,
        max_grad_norm: MaxGradNormOpt = 1.0,
        clipping_norm: ClippingNormOpt = 1.0,
        delta: DeltaOpt = 1e-5,
        accountant: AccountantOpt = "rdp",
        dp_optimizer: DpOptimizerOpt = "adam",
        dp_average: DpAverageOpt = 0.0,
        privacy_unit: PrivacyUnitOpt = "sample",
        secure_aggregation: SecureAggregationOpt = "default",
        secagg_threshold: SecaggThresholdOpt = None,
        dataset: DatasetOpt = "",
        adaptation: AdaptationOpt = "none",
        harmonization: HarmonizationOpt = "off",
        augmentation: AugmentationOpt = "off",
        init_from: InitFromOpt = "",
        init_weights: InitWeightsOpt = "random",
        keep_checkpoints: KeepCheckpointsOpt = 0,
        site_budget: Annotated[
            str,
            typer.Option(
                help="each simulated site's privacy budget: default (a new site's, as deployed) "
                "| unlimited (measure epsilon, do not ration it)"
            ),
        ] = "default",
        site_policy: Annotated[
            list[str] | None,
            typer.Option(
                help="KEY=VALUE for every simulated site's [policy] in site.toml (repeatable), "
                "e.g. share_landmarks=true: what a deployed site's operator must allow",
            ),
        ] = None,
        keep_warm: Annotated[
            int | None,
            typer.Option(
                min=0,
                help="site workers (model, decoded data) kept built between messages "
                "(default: all, for up to 8 sites; else none, the lowest memory)",
            ),
        ] = None,
        workers: Annotated[
            int | None,
            typer.Option(
                min=1,
                help="processes that run the sites' training in parallel; 1 runs them in "
                "this process, one after another (default: 1 for up to 8 sites, "
                "else one per core, at most 8)",
            ),
        ] = None,
        out: Annotated[
            Path, typer.Option(help="runs folder: the run folder goes to OUT/<run id>/")
        ] = Path("medfed-sim"),
        track: TrackOpt = None,
    ) -> None:
        """Run the ServerApp's strategies over N simulated sites on this machine.

        The same strategies, site training, DP and secure aggregation as a deployed
        run, and the same run folder (metrics, checkpoints, report); the server runs
        in this process, the sites in it or in --workers processes.
        """
        from medfed.local.sim_sites import (
            PartitionSpec,
            folder_sites,
            partitioned_sites,
            synthetic_sites,
        )
        from medfed.local.simulation import SIMULATION_BUDGET
        from medfed.local.simulation import simulate as run_simulation

        trackers = parse_trackers(track)
        run_config = build_run_config(
            task=task,
            strategy=strategy,
            rounds=rounds,
            strategy_option=strategy_option,
            min_sites=min_sites,
            local_epochs=local_epochs,
            batch_size=batch_size,
            lr=lr,
            seed=seed,
            round_timeout=round_timeout,
            name=name,
            dp=dp,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            max_grad_norm=max_grad_norm,
            clipping_norm=clipping_norm,
            delta=delta,
            accountant=accountant,
            dp_optimizer=dp_optimizer,
            dp_average=dp_average,
            privacy_unit=privacy_unit,
            secure_aggregation=secure_aggregation,
            dataset=dataset,
            adaptation=adaptation,
            init_from=init_from,
            init_weights=init_weights,
            where="medfed simulate options",
            secagg_threshold=secagg_threshold,
            harmonization=harmonization,
            augmentation=augmentation,
            keep_checkpoints=keep_checkpoints,
        )
        if partition not in PARTITIONS:
            raise ConfigError(
                f"Unknown partition {partition!r}.",
                where="--partition",
                expected=" | ".join(PARTITIONS),
            )
        if site_budget not in ("default", "unlimited"):
            raise ConfigError(
                f"Unknown site budget {site_budget!r}.",
                where="--site-budget",
                expected="default | unlimited",
            )
        policy = dict(
            parse_option(o, where="--site-policy", example="share_landmarks=true")
            for o in site_policy or []
        )
        out = out.resolve()
        if partition != "none":
            if data is None:
                raise ConfigError(
                    f"--partition {partition} shares out the subjects of a dataset, but no "
                    "--data was given.",
                    where="--partition",
                    fix="pass --data DIR (a `medfed data synth --out DIR` output)",
                )
            spec = PartitionSpec(
                sites=sites or len(folder_sites(data)),
                scheme=partition,
                by=partition_by,
                alpha=alpha,
                seed=seed,
            )
            folder = out / "partitions" / spec.folder_name(data)
            chosen = partitioned_sites(data, folder, spec)
            source = {
                "data": str(data.resolve()),
                "partition": spec.as_dict(),
                "partition_folder": str(folder),
            }
        elif data is not None:
            chosen = folder_sites(data)
            if sites is not None and sites != len(chosen):
                raise ConfigError(
                    f"--data has {len(chosen)} site folders, not {sites}.",
                    where="--sites",
                    fix=f"drop --sites, or share its subjects out: --partition iid --sites {sites}",
                )
            source = {"data": str(data.resolve())}
        else:
            chosen = synthetic_sites(sites or 3)
            source = {"data": "generated per site (seed 1000 + i, scanner profile i)"}
        if min_sites > len(chosen):
            raise ConfigError(
                f"--min-sites {min_sites} is more than the {len(chosen)} simulated sites.",
                where="--min-sites",
                fix=f"--min-sites {len(chosen)} or fewer",
            )
        if secure_aggregation == "off":
            console.print(
                "[bold yellow]warning:[/] secure aggregation is off (the server sees "
                "each update; debugging only)"
            )
        # Flower's per-round INFO lines are the ServerApp's log, not this terminal's
        logging.getLogger("flwr").setLevel(logging.WARNING)
        signal.signal(signal.SIGTERM, interrupt_on_signal)
        console.print(
            f"[bold]medfed simulate[/]: {task} with {strategy}, {len(chosen)} "
            f"simulated sites, {rounds} rounds, on this machine; runs in {out}"
        )
        view = ProgressView(console, rounds)
        from rich.progress import Progress

        with Progress(console=console, transient=True) as bar:
            job = bar.add_task("sites", total=None, visible=False)

            def on_site(phase: str, rnd: int, done: int, total: int, site: str) -> None:
                bar.update(
                    job,
                    completed=done,
                    total=total,
                    visible=done < total,
                    description=f"round {rnd} {phase}: {site}",
                )

            try:
                folder, summary = run_simulation(
                    run_config,
                    chosen,
                    out,
                    keep_warm=keep_warm,
                    workers=workers,
                    budget=SIMULATION_BUDGET if site_budget == "unlimited" else None,
                    policy=policy,
                    on_event=view,
                    on_site=on_site,
                    describe=source,
                )
            except KeyboardInterrupt:
                console.print("[yellow]interrupted[/]: the run folder keeps what was written")
                raise typer.Exit(130) from None
        print_summary(summary, folder.path)
        if not summary.completed and "[policy." in (summary.reason or ""):
            console.print(
                "  simulated sites take a [policy] key from the command line: "
                "--site-policy KEY=VALUE (e.g. share_landmarks=true)"
            )
        if summary.simulation is not None:
            console.print(f"  sites:      {summary.simulation.site_folders}")
        log_to_trackers(folder.path, trackers)
        if not summary.completed:
            raise typer.Exit(1)
