"""`medfed demo`: a whole federation on 127.0.0.1 in one command."""

from __future__ import annotations

import datetime as dt
import signal
import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from medfed.cli.main import console, interrupt_on_signal
from medfed.cli.options import (
    DpOpt,
    InitWeightsOpt,
    NoiseMultiplierOpt,
    RoundsOpt,
    SecureAggregationOpt,
    StrategyOpt,
    TargetEpsilonOpt,
    TaskOpt,
    TrackOpt,
)
from medfed.cli.progress import ProgressView
from medfed.core.errors import MedfedError


def register(app: typer.Typer) -> None:
    """Add the demo command."""

    @app.command("demo")
    def demo(
        out: Annotated[
            Path | None,
            typer.Option(help="folder for the federation (default: ./medfed-demo/<time>)"),
        ] = None,
        sites: Annotated[int, typer.Option(min=2, max=8, help="number of sites")] = 3,
        rounds: RoundsOpt = 3,
        task: TaskOpt = "brain-tissue-seg",
        strategy: StrategyOpt = "fedavg",
        dp: DpOpt = "off",
        noise_multiplier: NoiseMultiplierOpt = None,
        target_epsilon: TargetEpsilonOpt = 0.0,
        secure_aggregation: SecureAggregationOpt = "default",
        init_weights: InitWeightsOpt = "random",
        source: Annotated[
            str,
            typer.Option(
                help="where sites read data: synthetic (generated in memory) | dicom-folder "
                "(DICOM files written for each site) | dicomweb (each site's own Orthanc "
                "PACS, read over DICOMweb)"
            ),
        ] = "synthetic",
        track: TrackOpt = None,
    ) -> None:
        """Run a server and sites with their own data on loopback (TLS), train, report, stop."""
        from medfed.cli.run_cmd import log_to_trackers, parse_trackers, privacy_options

        trackers = parse_trackers(track)
        from medfed.core.config import RunConfig, validate
        from medfed.local import LocalFederation
        from medfed.local.demo_data import SOURCES, prepare_demo_data
        from medfed.strategies.registry import check_options, check_secure_aggregation
        from medfed.tasks import get_task
        from medfed.tasks.pretrain import check_init

        chosen = get_task(task)
        run = validate(
            RunConfig,
            {
                "task": task,
                "strategy": strategy,
                "rounds": rounds,
                "min_sites": sites,
                "name": "demo",
                "secure_aggregation": secure_aggregation,
                "init_weights": init_weights,
                "privacy": privacy_options(
                    dp,
                    noise_multiplier,
                    max_grad_norm=1.0,
                    clipping_norm=1.0,
                    delta=1e-5,
                    accountant="rdp",
                    target_epsilon=target_epsilon,
                ),
            },
            where="medfed demo options",
        )
        check_options(strategy, {})
        check_secure_aggregation(strategy, secure_aggregation)
        check_init(chosen, run.init_weights)
        if source not in SOURCES:
            raise MedfedError(
                f"unknown data source {source!r}",
                where="medfed demo --source",
                expected=" | ".join(SOURCES),
            )
        if secure_aggregation == "off":
            console.print("[bold yellow]warning:[/] secure aggregation is off (debugging only)")
        signal.signal(signal.SIGTERM, interrupt_on_signal)  # stop everything, as on Ctrl-C
        root = out or Path("medfed-demo") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        names = [f"site-{i + 1}" for i in range(sites)]
        t0 = time.time()
        try:
            with ExitStack() as servers, LocalFederation(root, names, name="demo") as fed:
                console.print(f"[bold]medfed demo[/]: federation in {root.resolve()}")
                site_data = prepare_demo_data(
                    source,
                    root.resolve(),
                    names,
                    servers,
                    say=lambda line: console.print(line, highlight=False),
                )
                fed.create(site_data=site_data)
                console.print(f"  server + {sites} sites on 127.0.0.1 (TLS, enrolled keys) ...")
                fed.start()
                console.print(f"  {sites} sites online after {time.time() - t0:.1f} s")
                folder, summary = fed.run(run, on_event=ProgressView(console, rounds))
        except KeyboardInterrupt:
            console.print(
                "[yellow]interrupted[/]: every process the demo started is stopped; "
                f"what was written is in {root}"
            )
            raise typer.Exit(130) from None
        if not summary.completed:
            console.print(f"[red]demo run {summary.status}[/]: {summary.reason}")
            raise typer.Exit(1)
        metric = str(summary.primary_metric)
        console.rule("result")
        median = statistics.median(summary.round_seconds.values())
        console.print(
            f"{sites} sites, {rounds} rounds of {task} with {strategy} "
            f"in {summary.seconds} s (median round {median:.2f} s)"
        )
        for r, m in sorted(summary.evaluate_metrics.items()):
            console.print(
                f"  round {r}: {metric} {m.get(metric, float('nan')):.4f}  "
                f"loss {m.get('loss', float('nan')):.4f}"
            )
        console.print(f"run folder: {folder.path}")
        console.print(f"  metrics:  {folder.metrics_file}")
        console.print(f"  plot:     {folder.plot_file}")
        console.print(f"  report:   {folder.report_file} (and {folder.html_report_file.name})")
        console.print(f"  model:    {folder.checkpoint_file(rounds)}")
        log_to_trackers(folder.path, trackers)
        if dp != "off":
            console.print(
                "a site's privacy ledger: medfed site budget --config "
                f"{fed.root / names[0] / 'site.toml'}"
            )
        console.print(f"all processes stopped; total {time.time() - t0:.1f} s")
