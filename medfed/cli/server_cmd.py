"""`medfed server ...`: the coordinator's federation server."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from medfed.cli.main import console, interrupt_on_signal

app = typer.Typer(help="Run the aggregation server and enrol sites (coordinator).",
                  no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the federation's server.toml")]


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="new federation folder")],
    name: Annotated[str, typer.Option(help="federation name")] = "federation",
    host: Annotated[list[str] | None, typer.Option(
        "--host", help="host name or IP sites dial (repeatable; the first goes in site.toml)"
    )] = None,
    port: Annotated[int, typer.Option(help="SuperLink port")] = 9200,
    bind: Annotated[str, typer.Option(help="address the SuperLink listens on")] = "127.0.0.1",
) -> None:
    """Create a federation folder: CA, server TLS certificate, server.toml."""
    from medfed.server.federation import init_federation

    hosts = host or ["127.0.0.1", "localhost"]
    path = init_federation(directory, name=name, hosts=hosts, port=port, bind_host=bind)
    console.print(f"[green]created[/] federation {name!r} in {directory}")
    console.print(f"  config:  {path}")
    console.print(f"  CA:      {directory / 'ca' / 'ca.pem'}  (give this to each site)")
    console.print(f"  next:    medfed server start --config {path}")


@app.command("enrol")
def enrol(
    public_key: Annotated[Path, typer.Argument(help="the site's keys/site.pub")],
    name: Annotated[str, typer.Option("--name", help="the site's name")],
    config: ConfigOpt = Path("server.toml"),
) -> None:
    """Enrol a site: only enrolled site keys can join the federation."""
    from medfed.core.errors import MedfedError
    from medfed.server.federation import Federation
    from medfed.server.superlink import sync_enrolment

    fed = Federation.load(config)
    entry = fed.enrol(public_key, name)
    console.print(f"[green]enrolled[/] site {name!r} ({entry['fingerprint']})")
    try:
        added = sync_enrolment(fed)
        if added:
            console.print("  registered with the running server")
    except MedfedError:
        console.print("  the server is not running; the site is registered when it starts")


@app.command("start")
def start(config: ConfigOpt = Path("server.toml")) -> None:
    """Run the SuperLink (TLS, site authentication, persistent state) until Ctrl-C."""
    from medfed.server.federation import Federation
    from medfed.server.superlink import start_superlink

    fed = Federation.load(config)
    proc = start_superlink(fed)
    link = fed.config.superlink
    console.print(f"[green]medfed server[/] {fed.config.federation!r} listening on "
                  f"https://{link.host}:{link.port} (sites dial {link.address})")
    console.print(f"  runs:  {fed.runs_dir}\n  log:   {proc.log_path}\n  Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:
        while proc.alive():
            time.sleep(0.5)
        console.print(f"[red]the SuperLink stopped[/] (exit {proc.proc.returncode}); "
                      f"last log lines:\n{proc.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping the server ...")
    finally:
        proc.stop()


@app.command("renew-cert")
def renew_cert(config: ConfigOpt = Path("server.toml"),
               days: Annotated[int, typer.Option(help="validity in days")] = 825) -> None:
    """Issue a new server TLS certificate from the federation CA (sites keep their CA)."""
    from medfed.server.federation import Federation, renew_server_cert

    path = renew_server_cert(Federation.load(config), days=days)
    console.print(f"[green]renewed[/] {path} (old files kept as .old); restart the server")


@app.command("sites")
def sites(config: ConfigOpt = Path("server.toml")) -> None:
    """List enrolled sites and, if the server runs, whether each is online."""
    from medfed.core.errors import MedfedError
    from medfed.server.control import Control
    from medfed.server.federation import Federation

    fed = Federation.load(config)
    status: dict[str, str] = {}
    try:
        with Control(fed.config.superlink.address, fed.ca_cert) as control:
            for node in control.nodes():
                status[bytes(node["public_key"]).decode().strip()] = str(node["status"])
    except MedfedError:
        pass
    table = Table("site", "fingerprint", "enrolled", "status")
    for site in fed.enrolled():
        table.add_row(site["name"], site["fingerprint"], site["enrolled"],
                      status.get(site["public_key"].strip(), "server not running"
                                 if not status else "never connected"))
    console.print(table)
