"""`medfed baseline`: pooled and site-alone training on the same data as a federated run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import typer
from rich.table import Table

from medfed.cli.main import console


def render_matrix(matrix: dict, metric: str, title: str) -> Table:
    """A model x site table of one metric, with the mean over sites."""
    sites = sorted(next(iter(matrix.values())))
    table = Table("model", *sites, "mean", title=title)
    for name, row in matrix.items():
        values = [row[s][metric] for s in sites]
        table.add_row(name, *(f"{v:.4f}" for v in values), f"{sum(values) / len(values):.4f}")
    return table


def register(app: typer.Typer) -> None:
    """Add the baseline command."""

    @app.command("baseline")
    def baseline(
        task: Annotated[str, typer.Option(help="task name")],
        data: Annotated[Path, typer.Option(help="folder of site folders (medfed data synth)")],
        mode: Annotated[str, typer.Option(help="centralized | local")] = "centralized",
        epochs: Annotated[int, typer.Option(min=1, help="training epochs")] = 3,
        batch_size: Annotated[int | None, typer.Option(help="batch size")] = None,
        lr: Annotated[float | None, typer.Option(help="learning rate")] = None,
        seed: Annotated[int, typer.Option(help="seed")] = 0,
        out: Annotated[Path | None, typer.Option(help="result folder")] = None,
    ) -> None:
        """Train pooled over all sites or each site alone; evaluate every model on every site."""
        import numpy as np

        from medfed.core.errors import ConfigError
        from medfed.core.files import atomic_write
        from medfed.data.sites import site_sources
        from medfed.tasks import engine, get_task
        from medfed.tasks.baseline import run_baseline

        if mode not in ("centralized", "local"):
            raise ConfigError(
                f"Unknown baseline mode {mode!r}.", where="--mode", expected="centralized or local"
            )
        chosen: Literal["centralized", "local"] = (
            "centralized" if mode == "centralized" else "local"
        )
        t = get_task(task)
        sources = site_sources(data, seed=seed)
        with console.status(f"loading {len(sources)} sites ..."):
            sites = {name: t.load_site_data(src) for name, src in sources.items()}
        device = engine.select_device()
        with console.status(f"training {mode} baseline on {device} ..."):
            result = run_baseline(
                t,
                sites,
                chosen,
                epochs=epochs,
                batch_size=batch_size,
                learning_rate=lr,
                device=device,
                seed=seed,
            )
        console.print(
            render_matrix(
                result.matrix,
                t.primary_metric,
                f"{task}: {mode} baseline, {t.primary_metric} per site",
            )
        )
        folder = out or Path(data) / f"baseline-{mode}-{task}"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            folder / "cross_site.json",
            json.dumps(
                {
                    "task": task,
                    "mode": mode,
                    "epochs": epochs,
                    "metric": t.primary_metric,
                    "matrix": result.matrix,
                },
                indent=2,
            ).encode(),
        )
        for name, model in result.models.items():
            np.savez(folder / f"{name.replace(':', '-')}.npz", **engine.get_weights(model))
        console.print(f"results: {folder}")
