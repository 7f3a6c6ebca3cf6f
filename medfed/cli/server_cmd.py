"""`medfed server ...`: the coordinator's federation server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from medfed.cli.main import console, interrupt_on_signal
from medfed.core.errors import MedfedError

app = typer.Typer(
    help="Run the aggregation server and enrol sites (coordinator).", no_args_is_help=True
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the federation's server.toml")]


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="new federation folder")],
    name: Annotated[str, typer.Option(help="federation name")] = "federation",
    host: Annotated[
        list[str] | None,
        typer.Option(
            "--host", help="host name or IP sites dial (repeatable; the first goes in site.toml)"
        ),
    ] = None,
    port: Annotated[int, typer.Option(help="SuperLink port")] = 9200,
    bind: Annotated[str, typer.Option(help="address the SuperLink listens on")] = "127.0.0.1",
    control_from: Annotated[
        list[str] | None,
        typer.Option(
            "--control-from",
            help="where coordinators may call the Control API from: "
            "'this-host' (default), a network such as 10.20.0.0/16, or 'any' (repeatable)",
        ),
    ] = None,
) -> None:
    """Create a federation folder: CA, server TLS certificate, server.toml."""
    from medfed.server.federation import init_federation

    hosts = host or ["127.0.0.1", "localhost"]
    path = init_federation(
        directory, name=name, hosts=hosts, port=port, bind_host=bind, control_from=control_from
    )
    console.print(f"[green]created[/] federation {name!r} in {directory}")
    console.print(f"  config:  {path}")
    console.print(f"  CA:      {directory / 'ca' / 'ca.pem'}  (give this to each site)")
    console.print(
        f"  coordinator credential: {directory / 'coordinator' / 'coordinator.key'}  "
        "(keep it private: it launches runs)"
    )
    console.print(f"  next:    medfed server start --config {path}")


@app.command("enrol")
def enrol(
    public_key: Annotated[Path, typer.Argument(help="the site's keys/site.pub")],
    name: Annotated[str, typer.Option("--name", help="the site's name")],
    secagg_key: Annotated[
        Path | None,
        typer.Option(
            "--secagg-key",
            help="the site's keys/secagg-identity.pub (default: the one beside "
            "PUBLIC_KEY); the federation CA certifies it for secure aggregation",
        ),
    ] = None,
    config: ConfigOpt = Path("server.toml"),
) -> None:
    """Enrol a site: only enrolled site keys can join the federation.

    Its secure-aggregation identity key is certified by the federation CA, so that the
    other sites can check it; enrolling the site again with a new one replaces it.
    """
    from medfed.core.errors import MedfedError
    from medfed.server.control import ServerUnreachable
    from medfed.server.federation import Federation
    from medfed.server.superlink import sync_enrolment

    fed = Federation.load(config)
    entry = fed.enrol(public_key, name, secagg_key)
    console.print(f"[green]enrolled[/] site {name!r} ({entry['fingerprint']})")
    if "secagg_fingerprint" in entry:
        console.print(f"  secure-aggregation key certified ({entry['secagg_fingerprint']})")
    else:
        console.print(
            "  [yellow]no secure-aggregation key:[/] the other sites refuse to mask "
            "with it until it is enrolled again with --secagg-key "
            "(the site's keys/secagg-identity.pub)"
        )
    try:
        added = sync_enrolment(fed)
        if added:
            console.print("  registered with the running server")
    except ServerUnreachable:
        console.print("  the server is not running; the site is registered when it starts")
    except MedfedError as exc:  # it answers, but not as this federation's server
        _warn_not_registered(
            exc,
            "the site is registered when `medfed server start` next "
            "runs, or run this command again once that is fixed",
        )


def _warn_not_registered(exc: MedfedError, then: str) -> None:
    """Say why the running server was not told, and what to do; the command goes on."""
    console.print(f"  [yellow]not registered with the running server:[/] {escape(exc.what)}")
    if exc.fix:
        console.print(f"  fix: {escape(exc.fix)}")
    console.print(f"  {then}")


@app.command("start")
def start(
    config: ConfigOpt = Path("server.toml"),
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="resume the runs a crash interrupted (default), or end them as failed",
        ),
    ] = True,
) -> None:
    """Run the SuperLink (TLS, site authentication, persistent state) until Ctrl-C.

    A SuperLink that stops is started again after a back-off, and its runs resume.
    """
    from medfed.server.federation import Federation
    from medfed.server.superlink import keep_running, start_superlink

    def said(outcome) -> None:  # noqa: ANN001 - a ResumeOutcome
        if outcome.resumed_as is not None:
            console.print(
                f"[yellow]resuming[/] run {outcome.run_id}, which the server "
                f"stopped during (server run {outcome.resumed_as})"
            )
        else:
            console.print(f"[red]ended[/] run {outcome.run_id}: {escape(outcome.reason)}")

    fed = Federation.load(config)
    proc = start_superlink(fed, resume=resume, on_resumed=said)
    link = fed.config.superlink
    console.print(
        f"[green]medfed server[/] {fed.config.federation!r} listening on "
        f"https://{link.host}:{link.port} (sites dial {link.address})"
    )
    console.print(f"  runs:  {fed.runs_dir}\n  log:   {proc.log_path}\n  Ctrl-C stops it.")
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:  # stops the SuperLink it runs when interrupted
        keep_running(
            proc,
            lambda: start_superlink(fed, resume=resume, on_resumed=said),
            report=lambda text: console.print(f"[red]{escape(text)}[/]"),
        )
    except KeyboardInterrupt:
        console.print("stopping the server ...")


@app.command("renew-cert")
def renew_cert(
    config: ConfigOpt = Path("server.toml"),
    days: Annotated[int, typer.Option(help="validity in days")] = 825,
) -> None:
    """Issue a new server TLS certificate from the federation CA (sites keep their CA).

    A running server serves it from its next connection on: no restart, here or at the
    sites (they pin the CA, not the certificate); sites cut off by an expired
    certificate reconnect on their own.
    """
    from medfed.core.identity import load_certificate
    from medfed.server.federation import Federation, renew_server_cert

    path = renew_server_cert(Federation.load(config), days=days)
    until = load_certificate(path).not_valid_after_utc
    console.print(
        f"[green]renewed[/] {path}, valid until {until:%Y-%m-%d} (the old one is kept as .old)"
    )
    console.print(
        "  a running server uses it from its next connection on; sites need "
        "nothing new and reconnect on their own"
    )


@app.command("rotate-ca")
def rotate_ca(
    config: ConfigOpt = Path("server.toml"),
    finish: Annotated[
        bool,
        typer.Option(
            "--finish",
            help="switch the server to a certificate of the new CA (once "
            "every site pins ca-bundle.pem)",
        ),
    ] = False,
    days: Annotated[
        int, typer.Option(help="validity of the new server certificate in days (with --finish)")
    ] = 825,
) -> None:
    """Replace the federation CA in two steps, with an overlap in which sites trust both.

    Without --finish: create the next CA and ca/ca-bundle.pem (current and next CA);
    give the bundle to every site. With --finish: the next CA becomes the federation
    CA and the server gets a certificate it issued (see deploy/README.md).
    """
    from medfed.core.errors import IdentityError
    from medfed.core.identity import load_certificate
    from medfed.core.procs import port_in_use
    from medfed.server.federation import (
        CaFiles,
        Federation,
        begin_ca_rotation,
        finish_ca_rotation,
        server_trusts,
    )

    fed = Federation.load(config)
    files = CaFiles.of(fed)
    link = fed.config.superlink
    if not finish:
        bundle = begin_ca_rotation(fed)
        console.print(f"[green]created[/] the next federation CA {files.next_cert}")
        console.print(
            f"  1. give every site {bundle}; each site operator saves it as the "
            "file of site.toml key site.federation_ca (no restart needed)"
        )
        if port_in_use(link.host, link.port):
            console.print(
                "  2. restart the server once (between runs), so that its own "
                "components trust the next CA too"
            )
        console.print(f"  3. then: medfed server rotate-ca --finish --config {fed.config_path}")
        return
    if (
        files.next_cert.exists()
        and port_in_use(link.host, link.port)
        and not server_trusts(fed, load_certificate(files.next_cert))
    ):
        raise IdentityError(
            "The running server started before this CA rotation began: its own components "
            "(the ServerApp of each run) would not trust a certificate of the next CA.",
            where=str(files.next_cert),
            fix="restart the server once (between runs), then run `medfed server rotate-ca "
            "--finish` again",
        )
    path = finish_ca_rotation(fed, days=days)
    console.print(
        f"[green]rotated[/]: {fed.ca_cert} is the new federation CA; {path} is "
        "issued by it (a running server uses it from its next connection on)"
    )
    console.print(
        f"  sites that pin {files.bundle.name} reconnect on their own; a site that "
        "still pins only the old CA says so in its log and needs the bundle"
    )
    console.print(
        f"  the old CA stays in {files.old_cert.name} (and its key in "
        f"{files.old_key.name}: delete that key once every site reconnected)"
    )


@app.command("sites")
def sites(config: ConfigOpt = Path("server.toml")) -> None:
    """List enrolled sites and, if the server runs, whether each is online."""
    from medfed.core.errors import MedfedError
    from medfed.server.control import Control, ServerUnreachable
    from medfed.server.federation import Federation

    fed = Federation.load(config)
    status: dict[str, str] = {}
    unknown = "server not running"
    try:
        with Control(fed.config.superlink.address, fed.ca_cert, fed.credential()) as control:
            for node in control.nodes():
                status[bytes(node["public_key"]).decode().strip()] = str(node["status"])
    except ServerUnreachable:
        pass
    except MedfedError as exc:  # it answers, but not as this federation's server
        console.print(f"[yellow]the server's site status is unknown:[/] {escape(exc.what)}")
        if exc.fix:
            console.print(f"  fix: {escape(exc.fix)}")
        unknown = "unknown (see above)"
    table = Table("site", "fingerprint", "enrolled", "status")
    for site in fed.enrolled():
        table.add_row(
            site["name"],
            site["fingerprint"],
            site["enrolled"],
            status.get(site["public_key"].strip(), unknown if not status else "never connected"),
        )
    console.print(table)


@app.command("dashboard")
def dashboard(
    config: ConfigOpt = Path("server.toml"),
    host: Annotated[
        str, typer.Option(help="address to listen on; another than loopback needs TLS and a token")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: a free one)")] = 8470,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM)")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="its private key (PEM)")] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(help="file holding the login token (or set MEDFED_DASHBOARD_TOKEN)"),
    ] = None,
) -> None:
    """Serve a read-only web page of the federation: sites, runs, live charts, checkpoints.

    It reads what `medfed runs`, `status` and `server sites` read (the run folders and
    the SuperLink), so it may be started and stopped at any time.
    """
    from medfed.core.web import Bind, Dashboard, read_token
    from medfed.server.dashboard.http import CoordinatorDashboard
    from medfed.server.federation import Federation

    fed = Federation.load(config)
    bind = Bind(host, port, tls_cert, tls_key, read_token(token_file))
    server = Dashboard(bind, CoordinatorDashboard(fed), where="medfed server dashboard").open()
    console.print(
        f"[green]dashboard[/] of {fed.config.federation!r}: {server.url}  (Ctrl-C stops it)"
    )
    if bind.token:
        console.print("  open it with ?token=TOKEN once, or log in with the token")
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("dashboard stopped")


coordinators_app = typer.Typer(
    help="Who may enrol sites and launch, stop or list runs (the Control API).",
    no_args_is_help=True,
)
app.add_typer(coordinators_app, name="coordinators")


@coordinators_app.command("add")
def coordinators_add(
    name: Annotated[str, typer.Argument(help="the new coordinator's name")],
    out: Annotated[Path, typer.Option(help="where to write the credential (private key)")],
    config: ConfigOpt = Path("server.toml"),
) -> None:
    """Make a credential for another coordinator and register its public key."""
    from medfed.server.coordinators import CoordinatorCredential
    from medfed.server.federation import Federation

    fed = Federation.load(config)
    registry = fed.coordinators
    registry.check_free(name)  # before a credential file is written
    credential = CoordinatorCredential.create(out, name, ca=fed.certificate_authority())
    registry.add(name, credential.public_pem(), credential.certificate_pem())
    console.print(f"[green]added[/] coordinator {name!r}; credential: {out} (mode 600)")
    console.print(
        f"  they use it as: medfed run ... --server {fed.config.superlink.address} "
        f"--ca ca.pem --credential {out.name}"
    )


@coordinators_app.command("revoke")
def coordinators_revoke(
    name: Annotated[str, typer.Argument(help="the coordinator to refuse from now on")],
    config: ConfigOpt = Path("server.toml"),
) -> None:
    """Refuse a coordinator's Control API calls from now on, and its runs at the sites."""
    from medfed.server.federation import Federation

    fed = Federation.load(config)
    listed = fed.revoke_coordinator(name)
    console.print(f"[green]revoked[/] coordinator {name!r}: the server refuses its calls now")
    if listed:
        console.print(
            f"  its certificate is on the CA's revocation list ({fed.revocations_file})"
            "; sites refuse its runs from the next message the server sends them"
        )
    else:
        console.print(
            "  [yellow]it was registered without a certificate:[/] sites cannot be "
            "told; runs it signed before still verify there until the CA rotates"
        )


@coordinators_app.command("list")
def coordinators_list(config: ConfigOpt = Path("server.toml")) -> None:
    """The registered coordinators, and which are revoked."""
    from medfed.server.federation import Federation

    table = Table("coordinator", "added", "revoked")
    for entry in Federation.load(config).coordinators.entries().values():
        table.add_row(entry["name"], entry.get("added", ""), entry.get("revoked", ""))
    console.print(table)
