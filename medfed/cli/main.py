"""The `medfed` command: typer app, error rendering, sub-command groups."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import typer
from rich.console import Console

from medfed.core.errors import MedfedError

console = Console(soft_wrap=True)  # paths are never broken across lines
err_console = Console(stderr=True, soft_wrap=True)  # errors are never cut mid-path

app = typer.Typer(
    name="medfed",
    help="Federated learning for medical imaging across hospital sites.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(exc: MedfedError) -> None:
    """Print a user error (no traceback) and exit non-zero."""
    from rich.markup import escape  # the texts name TOML tables ("[data]") and paths

    err_console.print(f"[bold red]error:[/] {escape(exc.what)}", highlight=False)
    for label, value in (("where", exc.where), ("expected", exc.expected), ("fix", exc.fix)):
        if value:
            err_console.print(f"  [bold]{label}:[/] {escape(value)}", highlight=False)
    raise SystemExit(2)


def interrupt_on_signal(signum: int, frame: object) -> None:
    """Signal handler: turn SIGTERM into the same clean shutdown path as Ctrl-C."""
    raise KeyboardInterrupt


def _register() -> None:
    from medfed.cli import (
        baseline_cmd,
        compare_cmd,
        data_cmd,
        demo_cmd,
        info_cmd,
        pretrain_cmd,
        run_cmd,
        server_cmd,
        simulate_cmd,
        site_cmd,
    )

    app.add_typer(server_cmd.app, name="server")
    app.add_typer(site_cmd.app, name="site")
    app.add_typer(data_cmd.app, name="data")
    for module in (
        run_cmd,
        simulate_cmd,
        info_cmd,
        demo_cmd,
        compare_cmd,
        baseline_cmd,
        pretrain_cmd,
    ):
        module.register(app)


def main(argv: list[str] | None = None) -> Any:
    """Entry point of the console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Flower logs through its own console handler; passed on to ours too, each line showed
    # twice, and its DEBUG lines with it (the root level does not filter propagated records).
    logging.getLogger("flwr").propagate = False
    _register()
    try:
        return app(args=argv, standalone_mode=True)
    except MedfedError as exc:  # every user error ends here: a message, no traceback
        fail(exc)
    except KeyboardInterrupt:
        err_console.print("interrupted")
        raise SystemExit(130) from None


if __name__ == "__main__":
    sys.exit(main())
