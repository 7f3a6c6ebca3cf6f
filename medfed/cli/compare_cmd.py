"""`medfed compare`: strategies and domain-adaptation hooks side by side, in simulation.

A researcher's plugin (docs/plugins.md) against the built-ins, on the same sites,
data, task, rounds and seed: one federation on 127.0.0.1 (``--engine deployment``: a
real SuperLink and site daemons, as `medfed demo`) or simulated sites in this process
(``--engine simulation``, :mod:`medfed.local.simulation`: many sites, cheaply), one
run per strategy x hook x harmonization x augmentation x DP mode, and a table of the
global model's score at every site. With ``--dp off,sample`` each DP run is
also scored against its non-private twin (what ``benchmarks/privacy_utility.py``
measures for the built-ins), so a hook or strategy is judged under DP too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.table import Column, Table

from medfed.cli.main import console, interrupt_on_signal
from medfed.cli.options import (
    AccountantOpt,
    BatchSizeOpt,
    ClippingNormOpt,
    DeltaOpt,
    DpAverageOpt,
    DpOptimizerOpt,
    InitWeightsOpt,
    LocalEpochsOpt,
    LrOpt,
    MaxGradNormOpt,
    NoiseMultiplierOpt,
    RoundsOpt,
    SeedOpt,
    TargetEpsilonOpt,
    TaskOpt,
)
from medfed.core.errors import ConfigError
from medfed.core.run_summary import RunSummary
from medfed.core.schema import EPSILON_RUN_KEY

#: What ``--dp``, ``--harmonizations`` and ``--augmentations`` may list.
DP_MODES = ("off", "sample", "update")
# RunConfig's values, spelled out so that the CLI starts without pydantic's models
# (tests/test_compare.py checks that they match)
HARMONIZATIONS = ("off", "histogram", "histogram-public")
AUGMENTATIONS = ("off", "contrast")
#: What ``--engine`` may be, and the most sites a loopback deployment starts.
ENGINES = ("deployment", "simulation")
MAX_DEPLOYED_SITES = 8

#: Runs one run configuration to its end: (run folder, summary).
RunOne = Callable[[Any], tuple[Any, RunSummary]]


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(
            f"No {what} named.",
            where=f"--{what}",
            expected="comma-separated names, e.g. fedavg,fedprox",
        )
    return names


def _options(texts: list[str], strategies: list[str]) -> dict[str, dict[str, Any]]:
    """``STRATEGY:KEY=VALUE`` options, per strategy."""
    from medfed.cli.run_cmd import parse_option

    out: dict[str, dict[str, Any]] = {s: {} for s in strategies}
    for text in texts:
        strategy, sep, option = text.partition(":")
        if not sep or strategy not in out:
            raise ConfigError(
                f"Strategy option {text!r} names no strategy of this comparison.",
                where="--strategy-option",
                expected=f"STRATEGY:KEY=VALUE with STRATEGY one "
                f"of {', '.join(strategies)}, e.g. fedprox:proximal_mu=0.01",
            )
        key, value = parse_option(option)
        out[strategy][key] = value
    return out


def _choices(text: str, flag: str, allowed: tuple[str, ...], example: str) -> list[str]:
    """The comma-separated values of ``--flag``, each one of ``allowed``, each once."""
    chosen = _names(text, flag)
    unknown = [c for c in chosen if c not in allowed]
    if unknown or len(set(chosen)) != len(chosen):
        raise ConfigError(
            f"Unknown or repeated value in --{flag} {text!r}"
            + (f": {', '.join(map(repr, unknown))}." if unknown else "."),
            where=f"--{flag}",
            expected=f"comma-separated, each once: {', '.join(allowed)}",
            fix=example,
        )
    return chosen


def _dp_modes(text: str) -> list[str]:
    return _choices(
        text,
        "dp",
        DP_MODES,
        "e.g. --dp off,sample to score DP-SGD against the same runs without DP",
    )


def _preprocessing(harmonization: str, augmentation: str) -> str:
    """How a run's site data was prepared, for the table: ``histogram + contrast``, ``none``."""
    used = [p for p in (harmonization, augmentation) if p != "off"]
    return " + ".join(used) or "none"


def _combine(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per combination of strategy, hook, preprocessing and DP mode.

    Each row holds its runs' mean, spread and per-site means.
    ``vs_no_dp`` of a DP row: its mean over the mean of its non-private twin.
    """
    groups: dict[tuple[str, str, str, str, str], list[dict[str, Any]]] = {}
    for r in results:
        key = (r["strategy"], r["adaptation"], r["harmonization"], r["augmentation"], r["dp"])
        groups.setdefault(key, []).append(r)
    rows = []
    for (strategy, hook, harmonization, augmentation, mode), runs in groups.items():
        done = [r for r in runs if r["status"] == "completed"]
        row: dict[str, Any] = {
            "strategy": strategy,
            "adaptation": hook,
            "harmonization": harmonization,
            "augmentation": augmentation,
            "dp": mode,
            "options": runs[0]["options"],
            "runs": len(runs),
            "completed": len(done),
        }
        if not done:
            rows.append({**row, "status": runs[0]["status"], "reason": runs[0].get("reason")})
            continue
        means = [r["mean"] for r in done]
        site_names = sorted({s for r in done for s in r["sites"]})
        eps = [r["epsilon"] for r in done if r["epsilon"] is not None]
        rows.append(
            {
                **row,
                "status": "completed",
                "metric": done[0]["metric"],
                "mean": statistics.fmean(means),
                "std": statistics.stdev(means) if len(means) > 1 else None,
                "sites": {
                    s: statistics.fmean(r["sites"][s] for r in done if s in r["sites"])
                    for s in site_names
                },
                "seconds": statistics.fmean(r["seconds"] for r in done),
                "epsilon": max(eps) if eps else None,
            }
        )
    twin_of = lambda r: (r["strategy"], r["adaptation"], r["harmonization"], r["augmentation"])  # noqa: E731
    plain = {twin_of(r): r["mean"] for r in rows if r["dp"] == "off" and r["status"] == "completed"}
    for r in rows:
        twin = plain.get(twin_of(r))
        if r["dp"] != "off" and r["status"] == "completed" and twin:
            r["vs_no_dp"] = r["mean"] / twin
    return rows


def _result(folder: Any, summary: RunSummary, rounds: int) -> dict[str, Any]:
    """The run's figures: mean and per-site score of the global model, time, epsilon."""
    metric = str(summary.primary_metric)
    row = json.loads(folder.cross_site_file.read_text())["matrix"]["global"]
    per_site = {s: float(m[metric]) for s, m in sorted(row.items())}
    eps = [
        m[EPSILON_RUN_KEY]
        for m in folder.read_metrics()
        if m["phase"] == "train" and m["round"] == rounds and EPSILON_RUN_KEY in m
    ]
    return {
        "status": "completed",
        "metric": metric,
        "mean": sum(per_site.values()) / max(len(per_site), 1),
        "sites": per_site,
        "seconds": summary.seconds,
        "epsilon": max(eps) if eps else None,
        "run_folder": str(folder.path),
    }


def register(app: typer.Typer) -> None:
    """Add the compare command."""

    @app.command("compare")
    def compare(
        strategies: Annotated[
            str, typer.Option(help="comma-separated strategies (`medfed strategies`)")
        ] = "fedavg,fedprox",
        adaptations: Annotated[
            str, typer.Option(help="comma-separated domain-adaptation hooks (`medfed adaptations`)")
        ] = "none",
        harmonizations: Annotated[
            str,
            typer.Option(
                help="comma-separated site-side intensity harmonizations to compare: "
                + " | ".join(HARMONIZATIONS)
                + " (for 'histogram' the sites compare creates are allowed to send their "
                "landmarks; not with DP, which does not cover them: 'histogram-public' is)"
            ),
        ] = "off",
        augmentations: Annotated[
            str,
            typer.Option(
                help="comma-separated site-side training augmentations to compare: "
                + " | ".join(AUGMENTATIONS)
            ),
        ] = "off",
        strategy_option: Annotated[
            list[str] | None,
            typer.Option(
                "--strategy-option",
                "-o",
                help="STRATEGY:KEY=VALUE, e.g. fedprox:proximal_mu=0.01 (repeatable)",
            ),
        ] = None,
        task: TaskOpt = "tiny-seg",
        sites: Annotated[
            int,
            typer.Option(min=2, help=f"number of sites (at most {MAX_DEPLOYED_SITES} deployed)"),
        ] = 3,
        engine: Annotated[
            str,
            typer.Option(
                help="deployment (a SuperLink and site daemons on 127.0.0.1) | simulation "
                "(simulated sites in this process; many sites)"
            ),
        ] = "deployment",
        rounds: RoundsOpt = 3,
        seed: SeedOpt = 0,
        repeats: Annotated[
            int,
            typer.Option(
                min=1,
                help="runs of each combination, at seeds SEED, SEED+1, ...: the table "
                "shows their mean and standard deviation",
            ),
        ] = 1,
        local_epochs: LocalEpochsOpt = None,
        batch_size: BatchSizeOpt = None,
        lr: LrOpt = None,
        dp: Annotated[
            str,
            typer.Option(
                help="comma-separated DP modes to compare: off | sample (DP-SGD) | update; "
                "with off among others, each DP run is scored against its off twin"
            ),
        ] = "off",
        noise_multiplier: NoiseMultiplierOpt = None,
        target_epsilon: TargetEpsilonOpt = 0.0,
        max_grad_norm: MaxGradNormOpt = 1.0,
        clipping_norm: ClippingNormOpt = 1.0,
        delta: DeltaOpt = 1e-5,
        accountant: AccountantOpt = "rdp",
        dp_optimizer: DpOptimizerOpt = "adam",
        dp_average: DpAverageOpt = 0.0,
        dp_local_epochs: Annotated[
            int | None, typer.Option(help="local epochs of the DP runs (default: --local-epochs)")
        ] = None,
        dp_batch_size: Annotated[
            int | None, typer.Option(help="batch size of the DP runs (default: --batch-size)")
        ] = None,
        dp_lr: Annotated[
            float | None, typer.Option(help="learning rate of the DP runs (default: --lr)")
        ] = None,
        init_weights: InitWeightsOpt = "random",
        out: Annotated[
            Path | None,
            typer.Option(
                help="folder for the federation and compare.json (default: ./medfed-compare/<time>)"
            ),
        ] = None,
    ) -> None:
        """Compare strategies and adaptation hooks on the same sites (loopback or simulated)."""
        from medfed.cli.run_cmd import privacy_options
        from medfed.core.config import RunConfig, validate
        from medfed.strategies.registry import check_options
        from medfed.tasks import get_task
        from medfed.tasks.adaptation import local_keys
        from medfed.tasks.pretrain import check_init, load_public_standard

        if engine not in ENGINES:
            raise ConfigError(
                f"Unknown engine {engine!r}.", where="--engine", expected=" | ".join(ENGINES)
            )
        if engine == "deployment" and sites > MAX_DEPLOYED_SITES:
            raise ConfigError(
                f"--sites {sites}: a loopback deployment starts at most {MAX_DEPLOYED_SITES} "
                "site daemons.",
                where="--sites",
                fix="--engine simulation for more sites",
            )
        chosen = get_task(task)
        names, hooks = _names(strategies, "strategies"), _names(adaptations, "adaptations")
        modes = _dp_modes(dp)
        harms = _choices(
            harmonizations, "harmonizations", HARMONIZATIONS, "e.g. --harmonizations off,histogram"
        )
        augs = _choices(
            augmentations, "augmentations", AUGMENTATIONS, "e.g. --augmentations off,contrast"
        )
        private_modes = [m for m in modes if m != "off"]
        harmonized = [h for h in harms if h == "histogram"]  # the sites send landmarks
        if harmonized and private_modes:
            raise ConfigError(
                f"Harmonization {harmonized[0]!r} sends each site's intensity landmarks, which "
                f"DP ({private_modes[0]}) does not cover: every site would refuse those runs "
                "(rule privacy.mode).",
                where="--harmonizations / --dp",
                fix="compare 'histogram' without DP (--dp off); under DP compare "
                "--harmonizations off,histogram-public",
            )
        options = _options(strategy_option or [], names)
        for s in names:
            check_options(s, options[s])
        for hook in hooks:  # an unknown hook or one that does not fit fails here
            local_keys(chosen, chosen.build_model(), hook)
        privacy = {
            m: privacy_options(
                m,
                noise_multiplier,
                max_grad_norm,
                clipping_norm,
                delta,
                accountant,
                dp_optimizer,
                dp_average,
                target_epsilon,
            )
            for m in modes
        }
        plain = {"local_epochs": local_epochs, "batch_size": batch_size, "learning_rate": lr}
        private = {
            key: plain[key] if value is None else value
            for key, value in (
                ("local_epochs", dp_local_epochs),
                ("batch_size", dp_batch_size),
                ("learning_rate", dp_lr),
            )
        }
        runs = [
            (
                s,
                h,
                harm,
                aug,
                m,
                validate(
                    RunConfig,
                    {
                        "task": task,
                        "strategy": s,
                        "strategy_options": options[s],
                        "rounds": rounds,
                        "min_sites": sites,
                        "seed": seed + k,
                        "adaptation": h,
                        "harmonization": harm,
                        "augmentation": aug,
                        "privacy": privacy[m],
                        "init_weights": init_weights,
                        **(plain if m == "off" else private),
                        "name": " ".join(
                            ["compare", s, h]
                            + [p for p in (harm, aug) if p != "off"]
                            + ([] if m == "off" else [f"dp-{m}"])
                        ),
                    },
                    where=f"medfed compare options (--dp {m})",
                ),
            )
            for s in names
            for h in hooks
            for harm in harms
            for aug in augs
            for m in modes
            for k in range(repeats)
        ]
        check_init(chosen, runs[0][-1].init_weights)
        if "histogram-public" in harms:
            load_public_standard(chosen)  # the task must ship them
        prepared = harms != ["off"] or augs != ["off"]
        signal.signal(signal.SIGTERM, interrupt_on_signal)
        root = (
            out or Path("medfed-compare") / dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        ).resolve()
        results: list[dict[str, Any]] = []
        t0 = time.time()
        try:
            console.print(
                f"[bold]medfed compare[/]: {len(runs)} runs of {task}, {sites} "
                f"sites ({engine}), {rounds} rounds each; in {root}"
            )
            if harmonized:
                console.print(
                    "  its sites are allowed to send their intensity landmarks for harmonization "
                    "(policy.share_landmarks = true; a deployed site's operator decides that)"
                )
            with _engine(
                engine, root, sites, rationed=modes == ["off"], share_landmarks=bool(harmonized)
            ) as run_one:
                for strategy, hook, harm, aug, mode, run in runs:
                    folder, summary = run_one(run)
                    result = {
                        "strategy": strategy,
                        "adaptation": hook,
                        "harmonization": harm,
                        "augmentation": aug,
                        "dp": mode,
                        "seed": run.seed,
                        "options": options[strategy],
                    }
                    if summary.completed:
                        result.update(_result(folder, summary, rounds))
                        shown = f"{result['metric']} {result['mean']:.4f}"
                    else:
                        result.update(status=summary.status, reason=summary.reason or "")
                        shown = f"[red]{result['status']}[/]"
                    dp_shown = "" if modes == ["off"] else f" {mode:<7}"
                    seed_shown = "" if repeats == 1 else f" seed {run.seed:<3}"
                    prep_shown = f" {_preprocessing(harm, aug):<20}" if prepared else ""
                    console.print(
                        f"  {strategy:<14} {hook:<18}{prep_shown}{dp_shown}{seed_shown} {shown}",
                        highlight=False,
                    )
                    results.append(result)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: every process it started is stopped")
            raise typer.Exit(130) from None
        combinations = _combine(results)
        (root / "compare.json").write_text(
            json.dumps(
                {
                    "task": task,
                    "sites": sites,
                    "engine": engine,
                    "rounds": rounds,
                    "seed": seed,
                    "repeats": repeats,
                    "init_weights": init_weights,
                    "privacy": privacy,
                    "combinations": combinations,
                    "runs": results,
                },
                indent=2,
            )
        )
        _print_table(combinations)
        console.print(f"compare.json and the run folders in {root}; total {time.time() - t0:.1f} s")
        if any(r["status"] != "completed" for r in results):
            raise typer.Exit(1)


@contextlib.contextmanager
def _engine(
    engine: str, root: Path, sites: int, *, rationed: bool, share_landmarks: bool
) -> Iterator[RunOne]:
    """What runs each run: a loopback federation, or simulated sites (the same data).

    ``rationed``: the sites keep a new site's privacy budget; else (DP runs) each site's
    budget is unlimited: a comparison measures epsilon, it does not ration it.
    ``share_landmarks``: the sites' policy lets them send their intensity landmarks
    (harmonization; a new site refuses under secure aggregation).
    """
    policy = {"share_landmarks": True} if share_landmarks else None
    from medfed.local.simulation import SIMULATION_BUDGET

    if engine == "simulation":
        from medfed.local.sim_sites import synthetic_sites
        from medfed.local.simulation import simulate

        logging.getLogger("flwr").setLevel(logging.WARNING)  # the ServerApp's own log lines
        simulated = synthetic_sites(sites)
        yield lambda run: simulate(
            run,
            simulated,
            root / "runs",
            budget=None if rationed else SIMULATION_BUDGET,
            policy=policy,
        )
        return
    from medfed.local import LocalFederation

    with LocalFederation(root, [f"site-{i + 1}" for i in range(sites)], name="compare") as fed:
        fed.create()
        if not rationed:
            fed.set_budget(**SIMULATION_BUDGET)
        if policy:
            fed.set_policy(**policy)
        fed.start()
        yield fed.run


def _print_table(results: list[dict[str, Any]]) -> None:
    """The combinations best first, then their scores per site (two tables: 80 columns)."""
    done = sorted((r for r in results if r["status"] == "completed"), key=lambda r: -r["mean"])
    failed = [r for r in results if r["status"] != "completed"]
    site_names = sorted({s for r in done for s in r["sites"]})
    metric = done[0]["metric"] if done else "score"
    with_dp = any(r["dp"] != "off" for r in results)
    with_prep = any(
        _preprocessing(r["harmonization"], r["augmentation"]) != "none" for r in results
    )
    prep = lambda r: [_preprocessing(r["harmonization"], r["augmentation"])] if with_prep else []  # noqa: E731
    with_eps = any(r["epsilon"] is not None for r in done)
    with_ratio = any("vs_no_dp" in r for r in done)
    number = lambda h: Column(h, justify="right", no_wrap=True)  # noqa: E731
    # fold, never cut: a shortened strategy or hook name would name the wrong run
    table = Table(
        number("#"),
        Column("strategy", overflow="fold"),
        Column("adaptation", overflow="fold"),
        *([Column("preprocessing", overflow="fold")] if with_prep else []),
        *([Column("dp")] if with_dp else []),
        number(f"mean {metric}"),
        *([number("DP/plain")] if with_ratio else []),
        number("s"),
        *([number("eps")] if with_eps else []),
        box=box.SIMPLE_HEAD,
        title="global model at each site's held-out split (best first)",
    )
    for i, r in enumerate(done, 1):
        table.add_row(
            str(i),
            r["strategy"],
            r["adaptation"],
            *prep(r),
            *([r["dp"]] if with_dp else []),
            _mean_shown(r),
            *([f"{r['vs_no_dp']:.3f}" if "vs_no_dp" in r else ""] if with_ratio else []),
            f"{r['seconds']:.1f}",
            *([f"{r['epsilon']:.3g}" if r["epsilon"] is not None else ""] if with_eps else []),
        )
    for r in failed:
        table.add_row(
            "",
            r["strategy"],
            r["adaptation"],
            *prep(r),
            *([r["dp"]] if with_dp else []),
            r["status"],
            *("" for _ in range(with_ratio + 1 + with_eps)),
        )
    console.print(table)
    if done:
        per_site = Table(
            number("#"),
            *(number(s) for s in site_names),
            box=box.SIMPLE_HEAD,
            title=f"{metric} per site",
        )
        for i, r in enumerate(done, 1):
            per_site.add_row(
                str(i), *(f"{r['sites'][s]:.4f}" if s in r["sites"] else "" for s in site_names)
            )
        console.print(per_site)


def _mean_shown(row: dict[str, Any]) -> str:
    """``0.7626``, ``0.7626 ± 0.0040`` over repeats, and how many ran when some failed."""
    text = f"{row['mean']:.4f}"
    if row["std"] is not None:
        text += f" ± {row['std']:.4f}"
    if row["completed"] < row["runs"]:
        text += f" ({row['completed']} of {row['runs']} runs)"
    return text
