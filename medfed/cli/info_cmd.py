"""`medfed strategies`, `medfed tasks` and `medfed adaptations`: what is registered."""

from __future__ import annotations

import typer
from rich.table import Table

from medfed.cli.main import console


def register(app: typer.Typer) -> None:
    """Add the listing commands."""

    @app.command("strategies")
    def strategies() -> None:
        """List aggregation strategies (built-in and plugins) with their options."""
        from medfed.strategies import STRATEGIES, strategy_options

        table = Table("name", "class", "origin", "options (default)")
        for name in STRATEGIES.names():
            cls = STRATEGIES.get(name)
            opts = ", ".join(f"{k}={v}" for k, v in strategy_options(name).items())
            table.add_row(
                name, f"{cls.__module__}.{cls.__qualname__}", STRATEGIES.origin(name), opts
            )
        console.print(table)

    @app.command("tasks")
    def tasks() -> None:
        """List tasks (built-in and plugins)."""
        from medfed.tasks import TASKS

        table = Table("name", "description", "metric", "public weights", "origin")
        for name in TASKS.names():
            task = TASKS.get(name)
            shipped = task.public_weights is not None and task.public_weights.is_file()
            table.add_row(
                name,
                task.description,
                task.primary_metric,
                "yes" if shipped else "-",
                TASKS.origin(name),
            )
        console.print(table)

    @app.command("adaptations")
    def adaptations() -> None:
        """List domain-adaptation hooks: which parameters each site keeps local."""
        from medfed.tasks.adaptation import ADAPTATIONS

        table = Table("name", "description", "origin")
        for name in ADAPTATIONS.names():
            table.add_row(name, ADAPTATIONS.get(name).description, ADAPTATIONS.origin(name))
        console.print(table)
