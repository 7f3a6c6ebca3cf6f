"""`medfed run / runs / status / stop`: the coordinator launches and watches runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.markup import escape
from rich.table import Column, Table

from medfed.cli.main import console
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
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.run_summary import RunSummary

if TYPE_CHECKING:
    from medfed.core.config import RunConfig


def parse_option(
    text: str, *, where: str = "--strategy-option", example: str = "proximal_mu=0.01"
) -> tuple[str, Any]:
    """Parse ``key=value``; the value becomes a bool, int, float or string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(
            f"Malformed option {text!r}.",
            where=where,
            expected=f"KEY=VALUE, e.g. {where} {example}",
        )
    low = raw.lower()
    if low in ("true", "false"):
        return key, low == "true"
    for cast in (int, float):
        try:
            return key, cast(raw)
        except ValueError:
            pass
    return key, raw


def privacy_options(
    mode: str,
    noise: float | None,
    max_grad_norm: float,
    clipping_norm: float,
    delta: float,
    accountant: str,
    optimizer: str = "adam",
    average_iterates: float = 0.0,
    target_epsilon: float = 0.0,
    unit: str = "sample",
) -> dict[str, Any]:
    """The run's privacy section from the command-line options.

    Without ``noise`` the noise multiplier is 1.0, or, with a ``target_epsilon``, 0
    (each site derives its own, with no floor).
    """
    if mode == "off":
        return {"mode": "off"}
    if noise is None:
        noise = 0.0 if target_epsilon > 0 else 1.0
    return {
        "mode": mode,
        "noise_multiplier": noise,
        "target_epsilon": target_epsilon,
        "max_grad_norm": max_grad_norm,
        "clipping_norm": clipping_norm,
        "target_delta": delta,
        "accountant": accountant,
        "optimizer": optimizer,
        "average_iterates": average_iterates,
        "unit": unit,
    }


class Target:
    """Where the server is: address, CA, and (when local) the runs folder."""

    def __init__(
        self,
        config: Path | None,
        server: str | None,
        ca: Path | None,
        credential: Path | None = None,
    ) -> None:
        self.runs_dir: Path | None = None
        self.credential_path = credential
        address, ca_path = server, ca
        if config is None and Path("server.toml").exists():
            config = Path("server.toml")
        if config is not None:
            from medfed.server.federation import Federation

            fed = Federation.load(config)
            address = address or fed.config.superlink.address
            ca_path = ca_path or fed.ca_cert
            self.runs_dir = fed.runs_dir
            self.credential_path = credential or fed.path(fed.config.coordinator.credential)
        if not address or not ca_path:
            raise ConfigError(
                "No server given.",
                where="medfed run",
                expected="--config server.toml (the federation folder), or --server HOST:PORT "
                "with --ca ca.pem",
                fix="pass --config path/to/server.toml",
            )
        self.address = address
        self.ca = ca_path

    def control(self):  # noqa: ANN201
        """A Control API client."""
        from medfed.server.control import Control
        from medfed.server.coordinators import CoordinatorCredential

        credential = (
            CoordinatorCredential.load(self.credential_path)
            if self.credential_path is not None
            else None
        )
        return Control(self.address, self.ca, credential)


# The options of a run (medfed/cli/options.py): `medfed run` and `simulate` take them all.
def build_run_config(
    *,
    task: str,
    strategy: str,
    rounds: int,
    strategy_option: list[str] | None,
    min_sites: int,
    local_epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int,
    round_timeout: float,
    name: str,
    dp: str,
    noise_multiplier: float | None,
    target_epsilon: float,
    max_grad_norm: float,
    clipping_norm: float,
    delta: float,
    accountant: str,
    dp_optimizer: str,
    dp_average: float,
    privacy_unit: str,
    secure_aggregation: str,
    dataset: str,
    adaptation: str,
    init_from: str,
    init_weights: str,
    where: str,
    secagg_threshold: int | None = None,
    harmonization: str = "off",
    augmentation: str = "off",
    keep_checkpoints: int = 0,
) -> RunConfig:
    """The run configuration of a run's options, checked before anything starts.

    An unknown or unfit strategy option, adaptation hook, initial weights or
    strategy under secure aggregation fails here, not at the sites.
    """
    from medfed.core.config import RunConfig, validate
    from medfed.strategies.registry import check_options, check_secure_aggregation
    from medfed.tasks import get_task
    from medfed.tasks.adaptation import local_keys
    from medfed.tasks.pretrain import check_init, load_public_standard

    options = dict(parse_option(o) for o in strategy_option or [])
    run_config = validate(
        RunConfig,
        {
            "task": task,
            "strategy": strategy,
            "strategy_options": options,
            "rounds": rounds,
            "min_sites": min_sites,
            "local_epochs": local_epochs,
            "batch_size": batch_size,
            "learning_rate": lr,
            "seed": seed,
            "round_timeout_s": round_timeout,
            "name": name,
            "dataset": dataset,
            "secure_aggregation": secure_aggregation,
            "secagg_threshold": secagg_threshold,
            "adaptation": adaptation,
            "harmonization": harmonization,
            "augmentation": augmentation,
            "init_from": init_from,
            "init_weights": init_weights,
            "keep_checkpoints": keep_checkpoints,
            "privacy": privacy_options(
                dp,
                noise_multiplier,
                max_grad_norm,
                clipping_norm,
                delta,
                accountant,
                dp_optimizer,
                dp_average,
                target_epsilon,
                privacy_unit,
            ),
        },
        where=where,
    )
    if run_config.harmonization == "histogram" and run_config.privacy.mode != "off":
        raise ConfigError(
            f"Harmonization {run_config.harmonization!r} sends each site's intensity "
            f"landmarks, which DP ({run_config.privacy.mode}) does not cover: every site "
            "would refuse the run (rule privacy.mode).",
            where="--harmonization / --dp",
            fix="harmonize onto the task's public landmarks under DP (--harmonization "
            "histogram-public), or run without DP",
        )
    chosen = get_task(task)
    if run_config.harmonization == "histogram-public":
        load_public_standard(chosen)  # the task must ship them: refused before anything starts
    local_keys(chosen, chosen.build_model(), adaptation)
    check_init(chosen, run_config.init_weights)
    check_options(strategy, options)
    check_secure_aggregation(strategy, secure_aggregation)
    return run_config


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="federation server.toml (default ./server.toml)"),
]
ServerOpt = Annotated[str | None, typer.Option("--server", help="server HOST:PORT")]
CaOpt = Annotated[Path | None, typer.Option("--ca", help="federation CA (ca.pem)")]
CredentialOpt = Annotated[
    Path | None,
    typer.Option(
        "--credential", help="coordinator credential (default: server.toml's [coordinator])"
    ),
]


def register(app: typer.Typer) -> None:
    """Add the run commands to the top-level app."""

    @app.command("run")
    def run(
        task: TaskOpt,
        strategy: StrategyOpt = "fedavg",
        rounds: RoundsOpt = 3,
        strategy_option: StrategyOptionOpt = None,
        min_sites: MinSitesOpt = 2,
        local_epochs: LocalEpochsOpt = None,
        batch_size: BatchSizeOpt = None,
        lr: LrOpt = None,
        seed: SeedOpt = 0,
        round_timeout: RoundTimeoutOpt = 600.0,
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
        detach: Annotated[bool, typer.Option(help="submit and return at once")] = False,
        track: TrackOpt = None,
        config: ConfigOpt = None,
        server: ServerOpt = None,
        ca: CaOpt = None,
        credential: CredentialOpt = None,
    ) -> None:
        """Launch a federated run on a running server and follow it."""
        from medfed.server.follow import follow_run

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
            where="medfed run options",
            secagg_threshold=secagg_threshold,
            harmonization=harmonization,
            augmentation=augmentation,
            keep_checkpoints=keep_checkpoints,
        )
        if secure_aggregation == "off":
            console.print(
                "[bold yellow]warning:[/] secure aggregation is off: the server will "
                "see every site's update (use only for debugging)"
            )
        trackers = parse_trackers(track)  # bad input fails before the run starts
        target = Target(config, server, ca, credential)
        if trackers and (detach or target.runs_dir is None):
            raise ConfigError(
                "--track logs a run this command follows to its end.",
                where="medfed run --track",
                expected="no --detach, and --config server.toml (the run folders are local)",
                fix="drop --detach, or log the run later: medfed track RUN_ID --to mlflow",
            )
        with target.control() as control:
            run_id = control.submit(run_config)
            console.print(f"submitted run [bold]{run_id}[/] to {target.address}")
            if detach or target.runs_dir is None:
                console.print(f"  follow it with: medfed status {run_id}")
                return
            summary = follow_run(
                control,
                run_id,
                target.runs_dir,
                on_event=ProgressView(console, rounds),
                timeout=round_timeout * rounds * 2 + 120,
            )
        print_summary(summary, target.runs_dir / str(run_id))
        log_to_trackers(target.runs_dir / str(run_id), trackers)
        if not summary.completed:
            raise typer.Exit(1)

    @app.command("track")
    def track_cmd(
        run_id: int,
        to: Annotated[
            list[str],
            typer.Option("--to", help="mlflow[:URI] | tensorboard[:DIR] (as `medfed run --track`)"),
        ],
        config: ConfigOpt = None,
    ) -> None:
        """Log a run (finished or not) from its run folder to MLflow or TensorBoard."""
        from medfed.core.runs import find_run

        trackers = parse_trackers(to)
        cfg = config or Path("server.toml")
        from medfed.server.federation import Federation

        folder = find_run(Federation.load(cfg).runs_dir, run_id)
        if not folder.run_file.exists():
            raise MedfedError(
                f"No run {run_id} in this federation's run folders.",
                where=str(folder.path.parent),
                fix="`medfed runs` lists the runs",
            )
        log_to_trackers(folder.path, trackers)

    @app.command("runs")
    def runs(
        config: ConfigOpt = None,
        server: ServerOpt = None,
        ca: CaOpt = None,
        credential: CredentialOpt = None,
    ) -> None:
        """List the runs of the federation."""
        from medfed.core.runs import RunFolder
        from medfed.server.control import ServerUnreachable

        target = Target(config, server, ca, credential)
        try:
            with target.control() as control:
                infos = sorted(control.runs(), key=lambda r: r.pending_at, reverse=True)
        except ServerUnreachable as exc:
            if target.runs_dir is None or not any(
                RunFolder(p).run_file.is_file() for p in target.runs_dir.glob("*")
            ):
                raise
            _runs_from_folders(target, exc)
            return
        rows = []
        latest = _latest_attempts(target, infos)
        for info in infos:
            if info.run_id not in latest:
                continue  # a resumed run's later attempt: shown on the run's own row
            now = latest[info.run_id]
            cfg = _local_config(target, info.run_id)
            status = _outcome(target, info.run_id) or now.status + (
                f":{now.sub_status}" if now.sub_status else ""
            )
            rows.append(
                (
                    str(info.run_id),
                    status + _resumed_note(target, info.run_id),
                    info.pending_at[:19],
                    now.finished_at[:19],
                    cfg.get("task", ""),
                    cfg.get("strategy", ""),
                )
            )
        _print_runs(rows, "submitted")

    @app.command("status")
    def status(
        run_id: int,
        config: ConfigOpt = None,
        server: ServerOpt = None,
        ca: CaOpt = None,
        credential: CredentialOpt = None,
    ) -> None:
        """Show one run: state, rounds done, latest metrics."""
        from medfed.core.runs import RunFolder
        from medfed.server.control import ServerUnreachable

        target = Target(config, server, ca, credential)
        run_id = _run_of(target, run_id)
        try:
            with target.control() as control:
                infos = control.runs(_last_attempt(target, run_id))
        except ServerUnreachable as exc:
            # The run folder is on this machine: what it holds needs no server.
            if target.runs_dir is None or not (target.runs_dir / str(run_id)).is_dir():
                raise
            console.print(
                f"[yellow]{escape(exc.what)}[/] ({escape(exc.fix)})\n  from the run folder instead:"
            )
            state = _outcome(target, run_id) or _UNFINISHED
        else:
            if not infos:
                raise ConfigError(
                    f"No run {run_id} on this server.", fix="`medfed runs` lists them"
                )
            info = infos[0]
            state = _outcome(target, run_id) or f"{info.status} {info.sub_status} {info.details}"
        console.print(f"run {run_id}: [bold]{escape(state + _resumed_note(target, run_id))}[/]")
        if target.runs_dir is not None:
            folder = RunFolder(target.runs_dir / str(run_id))
            events = folder.read_events()
            done = [e for e in events if e.is_("round-finished")]
            console.print(f"  rounds finished: {len(done)}   folder: {folder.path}")
            summary = folder.read_summary()
            if summary:
                print_summary(summary, folder.path)

    @app.command("stop")
    def stop(
        run_id: int,
        config: ConfigOpt = None,
        server: ServerOpt = None,
        ca: CaOpt = None,
        credential: CredentialOpt = None,
    ) -> None:
        """Stop a run."""
        target = Target(config, server, ca, credential)
        run_id = _run_of(target, run_id)
        attempt = _last_attempt(target, run_id)
        with target.control() as control:
            infos = control.runs(attempt)
            if not infos:
                raise ConfigError(
                    f"No run {run_id} on this server.", fix="`medfed runs` lists them"
                )
            if infos[0].status == "finished":
                outcome = _outcome(target, run_id) or infos[0].sub_status
                console.print(
                    f"run {run_id} has already finished ({outcome}); there is "
                    f"nothing to stop. `medfed status {run_id}` shows its result."
                )
                return
            ok = control.stop(attempt)
        console.print(f"run {run_id}: {'stopping' if ok else 'not stopped (already finished?)'}")


#: A run folder without a summary, read while the server is down.
_UNFINISHED = "not finished (no summary: still running when the server stopped, or running now)"


def _runs_from_folders(target: Target, exc: MedfedError) -> None:
    """`medfed runs` while the server is down: the run folders on this machine."""
    import datetime as dt

    from medfed.core.runs import RunFolder

    assert target.runs_dir is not None
    console.print(
        f"[yellow]{escape(exc.what)}[/] ({escape(exc.fix)})\n"
        "  the run folders on this machine instead:"
    )
    rows = []
    for path in target.runs_dir.iterdir():
        folder = RunFolder(path)
        if not folder.run_file.is_file() or not path.name.isdigit():
            continue
        info = folder.read_run()
        cfg = info.get("config", {})
        finished = ""
        if folder.summary_file.is_file():
            stamp = folder.summary_file.stat().st_mtime
            finished = dt.datetime.fromtimestamp(stamp, dt.timezone.utc).isoformat()[:19]
        rows.append(
            (
                info.get("started", "")[:19],
                path.name,
                _outcome(target, int(path.name)) or "not finished",
                finished,
                cfg.get("task", ""),
                cfg.get("strategy", ""),
            )
        )
    _print_runs(
        [
            (run_id, status, started, finished, task, strategy)
            for started, run_id, status, finished, task, strategy in sorted(rows, reverse=True)
        ],
        "started",
    )


def _print_runs(rows: list[tuple[str, ...]], since: str) -> None:
    """Print the runs table.

    The run id and its status are never cut (`medfed status` takes the id); on a
    narrow terminal the dates, task and strategy fold instead.
    """

    def whole(name: str, i: int) -> Column:
        return Column(name, no_wrap=True, min_width=max((len(r[i]) for r in rows), default=3))

    table = Table(
        whole("run", 0),
        whole("status", 1),
        *(Column(h, overflow="fold") for h in (since, "finished", "task", "strategy")),
    )
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _run_of(target: Target, run_id: int) -> int:
    """The run a server run id belongs to (a resumed run's later ids name its first)."""
    if target.runs_dir is None:
        return run_id
    from medfed.core.runs import run_id_of

    return int(run_id_of(target.runs_dir, run_id))


def _last_attempt(target: Target, run_id: int) -> int:
    """The server run id under which ``run_id`` runs now (its last resumption's)."""
    if target.runs_dir is None or not (target.runs_dir / str(run_id)).is_dir():
        return run_id
    from medfed.core.runs import RunFolder

    return int(RunFolder(target.runs_dir / str(run_id)).attempt_ids()[-1])


def _latest_attempts(target: Target, infos: list[Any]) -> dict[int, Any]:
    """Each run's first id -> the SuperLink's record of its latest attempt."""
    by_id = {i.run_id: i for i in infos}
    out = {}
    for info in infos:
        if _run_of(target, info.run_id) != info.run_id:
            continue
        out[info.run_id] = by_id.get(_last_attempt(target, info.run_id), info)
    return out


def _resumed_note(target: Target, run_id: int) -> str:
    """' (resumed at round k)' for a run a server restart resumed, else ''."""
    if target.runs_dir is None:
        return ""
    from medfed.core.runs import RunFolder

    resumed = RunFolder(target.runs_dir / str(run_id)).resumptions()
    if not resumed:
        return ""
    return " (resumed at round " + ", ".join(str(r["round"]) for r in resumed) + ")"


def _local_config(target: Target, run_id: int) -> dict[str, Any]:
    if target.runs_dir is None:
        return {}
    path = target.runs_dir / str(run_id) / "run.json"
    if not path.exists():
        return {}
    return dict(json.loads(path.read_text())["config"])


def _outcome(target: Target, run_id: int) -> str:
    """The outcome of a finished run (completed, refused, failed), from its summary.

    Flower's own status says only whether the ServerApp returned: a run the sites refused
    ends cleanly, so Flower calls it "completed".
    """
    if target.runs_dir is None:
        return ""
    from medfed.core.runs import RunFolder

    summary = RunFolder(target.runs_dir / str(run_id)).read_summary()
    return summary.status if summary else ""


def parse_trackers(texts: list[str] | None) -> list[Any]:
    """The ``--track`` values as trackers (a bad one is a ConfigError naming it)."""
    from medfed.core.tracking import Tracker

    return [Tracker.parse(t) for t in texts or []]


def log_to_trackers(folder: Path, trackers: list[Any]) -> None:
    """Log the run in ``folder`` to each tracker, saying where it went."""
    from medfed.core.runs import RunFolder

    for tracker in trackers:
        with console.status(f"logging the run to {tracker.kind} ..."):
            where = tracker.log(RunFolder(folder))
        console.print(f"  tracked:    {escape(where)}")


def print_summary(summary: RunSummary, folder: Path) -> None:
    """The end of a run on the terminal: its outcome, score and files."""
    from medfed.core.runs import RunFolder

    run = RunFolder(folder)
    if not summary.completed:
        console.print(
            f"[red]run {summary.status}[/]: {escape(summary.reason or '')}", highlight=False
        )
        if summary.final_checkpoint:  # a refused run keeps the rounds it finished
            console.print(
                f"  rounds finished: {summary.rounds_finished} of "
                f"{summary.rounds}; last model: "
                f"{folder / 'checkpoints' / summary.final_checkpoint}"
            )
        if run.report_file.exists():
            console.print(f"  report: {run.report_file}")
        return
    metric = summary.primary_metric or ""
    final = summary.final_metrics()
    console.print(
        f"[green]completed[/] {summary.rounds} rounds in {summary.seconds} s; "
        f"final {metric}: {final.get(metric, float('nan')):.4f}"
    )
    if summary.rounds_lost:  # the model is that of the last round that gave one
        console.print(f"  [yellow]rounds lost[/] (no new model): {summary.rounds_lost}")
    console.print(f"  run folder: {folder}")
    console.print(f"  model:      {folder / 'checkpoints' / str(summary.final_checkpoint)}")
    console.print(f"  plot:       {run.plot_file}")
    console.print(f"  report:     {run.report_file} (and {run.html_report_file.name})")
