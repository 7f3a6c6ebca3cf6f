"""`medfed compare`: strategies and domain-adaptation hooks side by side, in simulation.

A researcher's plugin (docs/plugins.md) against the built-ins, on the same sites,
data, task, rounds and seed: one federation on 127.0.0.1 (a real SuperLink and
site daemons, as `medfed demo`), one run per strategy x hook, and a table of the
global model's score at every site.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from medfed.cli.main import console, interrupt_on_signal
from medfed.core.errors import ConfigError

#: Each site's budget in a comparison: a simulation measures epsilon, it does not ration it.
SIMULATION_BUDGET = {"epsilon_max": 1e6, "min_noise_multiplier": 0.0,
                     "max_clipping_norm": 1e3, "dp_required": False}


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"No {what} named.", where=f"--{what}",
                          expected="comma-separated names, e.g. fedavg,fedprox")
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
                where="--strategy-option", expected=f"STRATEGY:KEY=VALUE with STRATEGY one "
                f"of {', '.join(strategies)}, e.g. fedprox:proximal_mu=0.01")
        key, value = parse_option(option)
        out[strategy][key] = value
    return out


def _result(folder: Any, summary: dict[str, Any], rounds: int) -> dict[str, Any]:
    """The run's figures: mean and per-site score of the global model, time, epsilon."""
    metric = summary["primary_metric"]
    row = json.loads(folder.cross_site_file.read_text())["matrix"]["global"]
    per_site = {s: float(m[metric]) for s, m in sorted(row.items())}
    eps = [m["epsilon-run"] for m in folder.read_metrics()
           if m["phase"] == "train" and m["round"] == rounds and "epsilon-run" in m]
    return {"status": "completed", "metric": metric,
            "mean": sum(per_site.values()) / max(len(per_site), 1), "sites": per_site,
            "seconds": summary["seconds"], "epsilon": max(eps) if eps else None,
            "run_folder": str(folder.path)}


def register(app: typer.Typer) -> None:
    """Add the compare command."""

    @app.command("compare")
    def compare(
        strategies: Annotated[str, typer.Option(
            help="comma-separated strategies (`medfed strategies`)")] = "fedavg,fedprox",
        adaptations: Annotated[str, typer.Option(
            help="comma-separated domain-adaptation hooks (`medfed adaptations`)")] = "none",
        strategy_option: Annotated[list[str] | None, typer.Option(
            "--strategy-option", "-o",
            help="STRATEGY:KEY=VALUE, e.g. fedprox:proximal_mu=0.01 (repeatable)")] = None,
        task: Annotated[str, typer.Option(help="task name (`medfed tasks`)")] = "tiny-seg",
        sites: Annotated[int, typer.Option(min=2, max=8, help="number of sites")] = 3,
        rounds: Annotated[int, typer.Option(min=1, help="federated rounds per run")] = 3,
        seed: Annotated[int, typer.Option(help="seed of the initial model")] = 0,
        dp: Annotated[str, typer.Option(help="off | sample (DP-SGD) | update")] = "off",
        noise_multiplier: Annotated[float, typer.Option(help="DP noise multiplier")] = 1.0,
        max_grad_norm: Annotated[float, typer.Option(help="DP-SGD per-sample clip")] = 1.0,
        out: Annotated[Path | None, typer.Option(
            help="folder for the federation and compare.json "
                 "(default: ./medfed-compare/<time>)")] = None,
    ) -> None:
        """Compare strategies and adaptation hooks on one simulated federation (loopback)."""
        from medfed.core.config import RunConfig, validate
        from medfed.local import LocalFederation
        from medfed.strategies.registry import check_options
        from medfed.tasks import get_task
        from medfed.tasks.adaptation import local_keys

        chosen = get_task(task)
        names, hooks = _names(strategies, "strategies"), _names(adaptations, "adaptations")
        options = _options(strategy_option or [], names)
        for s in names:
            check_options(s, options[s])
        for hook in hooks:  # an unknown hook or one that does not fit fails here
            local_keys(chosen, chosen.build_model(), hook)
        privacy = {"mode": dp, "noise_multiplier": noise_multiplier,
                   "max_grad_norm": max_grad_norm} if dp != "off" else {}
        runs = [(s, h, validate(RunConfig, {
            "task": task, "strategy": s, "strategy_options": options[s], "rounds": rounds,
            "min_sites": sites, "seed": seed, "adaptation": h, "privacy": privacy,
            "name": f"compare {s} {h}"}, where="medfed compare options"))
            for s in names for h in hooks]
        signal.signal(signal.SIGTERM, interrupt_on_signal)
        root = (out or Path("medfed-compare")
                / dt.datetime.now().strftime("%Y%m%d-%H%M%S")).resolve()
        results: list[dict[str, Any]] = []
        t0 = time.time()
        try:
            with LocalFederation(root, [f"site-{i + 1}" for i in range(sites)],
                                 name="compare") as fed:
                fed.create()
                if dp != "off":
                    fed.set_budget(**SIMULATION_BUDGET)
                console.print(f"[bold]medfed compare[/]: {len(runs)} runs of {task}, {sites} "
                              f"sites, {rounds} rounds each; federation in {root}")
                fed.start()
                for strategy, hook, run in runs:
                    folder, summary = fed.run(run)
                    result = {"strategy": strategy, "adaptation": hook,
                              "options": options[strategy]}
                    if summary.get("status") == "completed":
                        result.update(_result(folder, summary, rounds))
                        shown = f"{result['metric']} {result['mean']:.4f}"
                    else:
                        result.update(status=summary.get("status", "failed"),
                                      reason=summary.get("reason", ""))
                        shown = f"[red]{result['status']}[/]"
                    console.print(f"  {strategy:<14} {hook:<18} {shown}", highlight=False)
                    results.append(result)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/]: every process it started is stopped")
            raise typer.Exit(130) from None
        (root / "compare.json").write_text(json.dumps(
            {"task": task, "sites": sites, "rounds": rounds, "seed": seed, "privacy": privacy,
             "runs": results}, indent=2))
        _print_table(results)
        console.print(f"compare.json and the run folders in {root}; total "
                      f"{time.time() - t0:.1f} s")
        if any(r["status"] != "completed" for r in results):
            raise typer.Exit(1)


def _print_table(results: list[dict[str, Any]]) -> None:
    done = [r for r in results if r["status"] == "completed"]
    site_names = sorted({s for r in done for s in r["sites"]})
    metric = done[0]["metric"] if done else "score"
    with_eps = any(r["epsilon"] is not None for r in done)
    # fold, never cut: a shortened strategy or hook name would name the wrong run
    table = Table(*(Column(h, overflow="fold") for h in (
        "strategy", "adaptation", f"mean {metric}", *site_names, "seconds",
        *(["epsilon"] if with_eps else []))),
        title="global model at each site's held-out split (best first)")
    for r in sorted(done, key=lambda r: -r["mean"]):
        eps = ([] if not with_eps else ["" if r["epsilon"] is None else f"{r['epsilon']:.3g}"])
        table.add_row(r["strategy"], r["adaptation"], f"{r['mean']:.4f}",
                      *(f"{r['sites'].get(s, float('nan')):.4f}" for s in site_names),
                      f"{r['seconds']:.1f}", *eps)
    for r in results:
        if r["status"] != "completed":
            table.add_row(r["strategy"], r["adaptation"], r["status"],
                          *("" for _ in range(len(site_names) + 1 + with_eps)))
    console.print(table)
