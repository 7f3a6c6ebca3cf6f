"""`medfed site ...`: the site operator's commands."""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Column, Table

from medfed.cli.main import console, interrupt_on_signal
from medfed.core import wire
from medfed.core.parent_watch import EXIT_WITH_PARENT_ENV

app = typer.Typer(
    help="Enrol, configure and run a hospital site (site operator).", no_args_is_help=True
)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="the site's site.toml")]


@app.command("init")
def init(
    name: Annotated[str, typer.Argument(help="site name, e.g. st-elsewhere-radiology")],
    directory: Annotated[Path, typer.Argument(help="new site folder")],
    federation_ca: Annotated[Path, typer.Option("--federation-ca", help="the federation's ca.pem")],
    server: Annotated[str, typer.Option(help="the server's HOST:PORT")] = "127.0.0.1:9200",
    runtime_port: Annotated[int, typer.Option(help="local port for the SuperNode")] = 9300,
) -> None:
    """Create a site folder: key pair, pinned federation CA, site.toml."""
    from medfed.client.site import init_site

    path = init_site(
        directory, name=name, federation_ca=federation_ca, server=server, runtime_port=runtime_port
    )
    console.print(f"[green]created[/] site {name!r} in {directory}")
    console.print(f"  config:      {path}   (data source, privacy policy, compute)")
    keys = directory / "keys"
    console.print(f"  public keys: {keys / 'site.pub'} and {keys / 'secagg-identity.pub'}")
    console.print("               -> send both to the coordinator, who runs:")
    console.print(
        f"               medfed server enrol site.pub --name {name} "
        "--secagg-key secagg-identity.pub"
    )
    console.print(f"  next:        medfed site start --config {path}")


@app.command("start")
def start(
    config: ConfigOpt = Path("site.toml"),
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the site daemon (SuperNode + warm worker) until Ctrl-C.

    It restarts its SuperNode itself and rides out the server being down or presenting
    a certificate it cannot verify (it says once who must do what). It exits with status
    2 only for a configuration error a restart cannot fix (bad site.toml, missing key,
    key not enrolled, runtime port taken).
    """
    from medfed.client.daemon import SiteDaemon

    logging.getLogger("medfed").setLevel(logging.INFO if verbose else logging.WARNING)
    if os.environ.get(EXIT_WITH_PARENT_ENV):
        from medfed.core.parent_watch import watch_parent

        watch_parent()  # started by `medfed demo` or a test: never outlive it
    daemon = SiteDaemon(config)
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:
        daemon.start()
        assert daemon.worker is not None
        console.print(
            f"[green]site {daemon.name!r}[/] connecting to {daemon.config.site.server} "
            f"(device: {daemon.worker.device}); Ctrl-C stops it."
        )
        daemon.wait()
    except KeyboardInterrupt:
        console.print("stopping the site ...")
    finally:
        daemon.stop()
    _exit_stopped()


def _exit_stopped() -> None:
    """Exit right away, the daemon having stopped in order.

    Tearing down an interpreter that holds torch, MONAI, the warm model and the decoded
    data took 1-30 s (its final garbage collection), and a service manager or `medfed
    demo` waits on it. Everything the site writes (ledger, audit log, site-local
    parameters, secure-aggregation state) is on disk before its reply leaves, so
    nothing is lost by skipping it; only the output streams are flushed.
    """
    import sys

    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


@app.command("audit")
def audit(
    config: ConfigOpt = Path("site.toml"),
    last: Annotated[int, typer.Option(help="show the last N records")] = 20,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verify: Annotated[
        bool,
        typer.Option(
            "--verify",
            help="check the log's hash chain: exit 1 if a line was edited, "
            "inserted or deleted; torn lines (a crash while writing) are warnings",
        ),
    ] = False,
) -> None:
    """Show the site's audit log: what left the site, when, its size and hash."""
    from medfed.client.audit import AuditLog
    from medfed.core.config import SiteConfig, load_toml, resolve

    cfg = load_toml(config, SiteConfig)
    log = AuditLog(resolve(config, cfg.site.audit_log))
    if verify:
        _print_verification(log.verify(), as_json=as_json)
        return
    records = log.read()[-last:]
    if as_json:
        for r in records:
            console.print_json(json.dumps(r))
        return
    # One line per record (time, event, run, round: never broken, 65 columns), then what
    # it says, indented, wrapped to the terminal; each day opens with its date.
    import textwrap

    from rich.text import Text

    day = ""
    for r in records:
        if r["time"][:10] != day:
            day = r["time"][:10]
            console.print(f"[bold]{day}[/] (UTC)")
        rnd = f"round {r['round']}" if r.get("round") is not None else ""
        console.print(
            Text(
                f"{r['time'][11:19]}  {r['event']:<25}  "
                f"{str(r.get('run_id', '')):<19}  {rnd}".rstrip()
            ),
            soft_wrap=True,
        )
        details = _audit_details(r)
        for line in textwrap.wrap(
            details, width=max(console.width - 10, 30), break_on_hyphens=False
        ):
            console.print(Text(" " * 10 + line), soft_wrap=True)
    console.print("[dim]hashes shortened; `medfed site audit --json` prints whole records[/]")


def _print_verification(v: Any, *, as_json: bool) -> None:
    """``medfed site audit --verify``: what the chain check found; exit 1 when broken."""
    import dataclasses

    if as_json:
        print(
            json.dumps({**dataclasses.asdict(v), "path": str(v.path), "intact": v.intact}, indent=2)
        )
    else:
        console.print(
            f"audit log {v.path}: {v.records} records ({v.chained} chained, "
            f"{v.legacy} unchained legacy records written before the chain)",
            highlight=False,
        )
        for t in v.torn:
            what = (
                "a torn last line, without its newline (a crash while writing): the "
                "next record ends it and notes it"
                if not t.terminated
                else "not a record (torn by a crash while writing)"
                + ("; noted by the record after it" if t.noted else "")
                + ("; the record glued after it is read back" if t.salvaged else "")
            )
            console.print(
                f"[yellow]warning:[/] line {t.line} (byte {t.offset}, {t.size} bytes): {what}",
                highlight=False,
            )
        for b in v.breaks:
            console.print(
                f"[bold red]broken:[/] line {b.line}: {b.what}\n"
                f"  expected: {b.expected}\n  found:    {b.found}",
                highlight=False,
            )
        if v.intact:
            console.print(
                f"[green]chain intact[/]: head seq {v.head_seq}, {v.head} (note it "
                "elsewhere: a later check that no longer reaches it shows a rewrite)",
                highlight=False,
            )
        else:
            console.print(
                f"[bold red]chain broken[/]: {len(v.breaks)} break(s); records were "
                "edited, inserted or deleted. Keep this file as it is and compare it "
                "with a backup.",
                highlight=False,
            )
    if not v.intact:
        raise typer.Exit(1)


def _audit_details(record: dict[str, Any]) -> str:
    """What an audit record says beyond its event: epsilon and size of an update, a rule."""
    parts = []
    event = record.get("event")
    if event == "privacy-reserved":
        parts.append(f"reserved epsilon {record.get('epsilon', 0):.4g} on {record.get('dataset')}")
    elif event == "privacy-hold":
        parts.append(
            f"holds epsilon {record.get('epsilon', 0):.4g} on {record.get('dataset')} "
            f"until {_minute(record.get('expires'))}"
        )
    elif event == "privacy-hold-released":
        parts.append(f"released the hold on {record.get('dataset')}")
    elif event in ("ledger-created", "ledger-adopted", "ledger-rebuilt"):
        parts.append(
            f"ledger {record.get('ledger_id')}"
            + (f" ({record['problem']})" if record.get("problem") else "")
        )
    elif event == "audit-torn-line":
        parts.append(
            f"the line before this one is torn (a crash while writing), at byte "
            f"{record.get('offset')}"
        )
    privacy = record.get("privacy") or {}
    if "epsilon_round" in privacy:
        fitted = ", fitted to the budget" if privacy.get("noise_fitted_to_budget") else ""
        parts.append(
            f"epsilon {privacy['epsilon_round']:.4g} (run {privacy['epsilon_run']:.4g}, "
            f"noise {privacy['noise_multiplier']:.3g}{fitted})"
        )
    if wire.FITTED_NOISE_KEY in record:  # a join's forecast (worker._query)
        parts.append(f"noise {record[wire.FITTED_NOISE_KEY]:.3g}, fitted to the budget")
    if wire.BUDGET_ROUNDS_KEY in record:
        parts.append(f"budget covers rounds 1-{record[wire.BUDGET_ROUNDS_KEY]}")
    if "bytes" in record:
        parts.append(f"{record['bytes']} bytes")
    if record.get("hash"):
        parts.append(str(record["hash"])[:23])  # sha256: and 16 hex digits
    if record.get("rule"):
        parts.append(f"{record['rule']}: {record.get('reason') or ''}")
    elif record.get("reason"):
        parts.append(str(record["reason"]))
    return "; ".join(parts)


def _minute(iso: str | None) -> str:
    """``2026-11-27T18:35:22+00:00`` -> ``2026-11-27 18:35`` (the ledger writes UTC)."""
    return str(iso or "")[:16].replace("T", " ")


def _span(first: str | None, last: str | None) -> str:
    """First and last spend of a run: ``2026-11-28 01:15-01:16`` when on one day."""
    a, b = _minute(first), _minute(last)
    if a == b:
        return a
    return f"{a}-{b[11:]}" if a[:10] == b[:10] else f"{a} - {b}"


def _compact_table(*columns: Column, title: str) -> Table:
    """A table without vertical rules, so that a run id and a day's dates fit 80 columns."""
    from rich import box

    for column in columns:  # a header may wrap between its words, never inside one
        column.min_width = max(len(w) for w in str(column.header).split())
    return Table(
        *columns,
        title=title,
        box=box.SIMPLE_HEAD,
        show_edge=False,
        pad_edge=False,
        collapse_padding=True,
    )


@app.command("budget")
def budget(
    config: ConfigOpt = Path("site.toml"),
    as_json: Annotated[
        bool, typer.Option("--json", help="one JSON object, e.g. for monitoring what is left")
    ] = False,
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild-from-audit",
            help="restore a missing, replaced or damaged ledger "
            "from the audit log (the old file is kept aside; the rebuild is audited)",
        ),
    ] = False,
) -> None:
    """Privacy budget: spent and remaining epsilon per dataset, and per run, with dates."""
    import dataclasses

    from medfed.cli.main import fail
    from medfed.client.audit import AuditLog
    from medfed.client.ledger import LedgerError, LedgerSummary
    from medfed.client.ledger_audit import AuditedSpends, check_ledger
    from medfed.core.config import SiteConfig, load_toml, resolve

    cfg = load_toml(config, SiteConfig)
    if rebuild:
        _rebuild(cfg, config, as_json=as_json)
        return
    try:  # the ledger must hold what the audit log records; read only, nothing created
        ledger = check_ledger(
            resolve(config, cfg.privacy.ledger),
            AuditedSpends.of(AuditLog(resolve(config, cfg.site.audit_log)).read()),
            config=config,
        )
        summary = ledger.summary() if ledger else LedgerSummary([], [])
        holds = ledger.holds() if ledger else []
        datasets = sorted(cfg.privacy.datasets.items())
        spent = {name: ledger.spent(name) if ledger else 0.0 for name, _ in datasets}
    except LedgerError as exc:
        fail(exc)
    held = {
        name: sum(h.outstanding for h in holds if h.dataset == name and not h.expired)
        for name, _ in datasets
    }
    if as_json:
        print(
            json.dumps(
                {
                    "datasets": {
                        name: {
                            **b.model_dump(),
                            "spent": spent[name],
                            "remaining": b.epsilon_max - spent[name],
                            "held": held[name],
                        }
                        for name, b in datasets
                    },
                    "runs": [dataclasses.asdict(r) for r in summary.runs],
                    "holds": [dataclasses.asdict(h) for h in holds],
                },
                indent=2,
            )
        )
        return
    fitting = any(b.max_fitted_noise_multiplier for _, b in datasets)
    # fold, never truncate: on a narrow terminal a cut date or unit would mislead
    table = _compact_table(
        *(
            Column(h, overflow="fold")
            for h in (
                "dataset",
                "epsilon max",
                "delta",
                "spent",
                "remaining",
                "dp required",
                "unit required",
                *(["fits noise up to"] if fitting else []),
            )
        ),
        title="privacy budget per dataset",
    )
    for name, b in datasets:
        table.add_row(
            name,
            f"{b.epsilon_max:g}",
            f"{b.delta:g}",
            f"{spent[name]:.4f}",
            f"{b.epsilon_max - spent[name]:.4f}",
            "yes" if b.dp_required else "no",
            b.privacy_unit,
            *(
                [f"{b.max_fitted_noise_multiplier:g}" if b.max_fitted_noise_multiplier else "-"]
                if fitting
                else []
            ),
        )
    console.print(table)
    runs = _compact_table(
        Column("run", no_wrap=True),
        *(
            Column(h, overflow="fold")
            for h in ("dataset", "unit", "rounds", "epsilon", "when (UTC)")
        ),
        title="per run (unit: what its epsilon protects; unsent: reserved, maybe never "
        "sent, counted as spent)",
    )
    for r in summary.runs:
        unsent = f" ({r.reserved} unsent)" if r.reserved else ""
        runs.add_row(
            str(r.run_id),
            r.dataset,
            r.unit,
            str(r.rounds),
            f"{r.epsilon:.4f}{unsent}",
            _span(r.first, r.last),
        )
    console.print(runs)
    if holds:
        table = _compact_table(
            Column("run", no_wrap=True),
            *(Column(h, overflow="fold") for h in ("dataset", "holds", "unspent", "until (UTC)")),
            title="holds of joined runs (kept from other runs until the run ends or the "
            "hold expires)",
        )
        for h in holds:
            table.add_row(
                h.run_id,
                h.dataset,
                f"{h.epsilon:.4f}",
                f"{h.outstanding:.4f}",
                _minute(h.expires) + (" (expired)" if h.expired else ""),
            )
        console.print(table)


def _rebuild(cfg: Any, config: Path, *, as_json: bool) -> None:
    """``medfed site budget --rebuild-from-audit``: restore the ledger, say what it holds."""
    import dataclasses

    from medfed.cli.main import fail
    from medfed.client.ledger import LedgerError
    from medfed.client.privacy_guard import rebuild_ledger

    try:
        done = rebuild_ledger(cfg, config)
    except LedgerError as exc:
        fail(exc)
    r = done.result
    if as_json:
        print(
            json.dumps(
                {
                    "ledger": str(done.path),
                    "ledger_id": r.ledger_id,
                    "problem": done.problem,
                    "kept_aside": [str(a) for a in done.kept_aside],
                    "datasets": [dataclasses.asdict(d) for d in r.datasets],
                    "holds": [list(h) for h in r.holds],
                },
                indent=2,
            )
        )
        return
    console.print(
        f"[green]rebuilt[/] the privacy ledger from the audit log: {done.path}", highlight=False
    )
    console.print(f"  why:        {done.problem}", highlight=False)
    console.print(
        "  kept aside: "
        + (", ".join(str(a) for a in done.kept_aside) or "nothing (there was no file)"),
        highlight=False,
    )
    table = _compact_table(
        *(
            Column(h, overflow="fold")
            for h in ("dataset", "epsilon spent", "runs", "rounds", "unsent")
        ),
        title="restored per dataset (unsent: reserved, maybe never sent, counted as spent)",
    )
    for d in r.datasets:
        table.add_row(d.dataset, f"{d.epsilon:.4f}", str(d.runs), str(d.rounds), str(d.unsent))
    console.print(table)
    for run_id, dataset, eps in r.holds:
        console.print(
            f"  hold restored: run {run_id} on {dataset}, epsilon {eps:.4f}", highlight=False
        )
    console.print(
        f"  audited as ledger-rebuilt (ledger {r.ledger_id}); DP rounds run again", highlight=False
    )


@app.command("scan")
def scan(
    config: ConfigOpt = Path("site.toml"),
    decode: Annotated[bool, typer.Option(help="also decode pixel data")] = True,
    report: Annotated[
        Path | None,
        typer.Option(
            help="where to write the JSON report (default: scan-report.json beside site.toml)"
        ),
    ] = None,
) -> None:
    """Read every file of the site's data folder (DICOM, NIfTI, MSD, BIDS) and check its cache."""
    from rich.progress import Progress

    from medfed.core.config import SiteConfig, load_toml
    from medfed.core.errors import ConfigError
    from medfed.data import check_source_available, scan_source

    cfg = load_toml(config, SiteConfig)
    if cfg.data.kind == "synthetic":
        raise ConfigError(
            "This site has no data folder to scan (data.kind = 'synthetic').",
            where=f"{config} [data]",
            expected='data.kind = "dicom-folder", "nifti-folder", "msd" or "bids" and data.path',
            fix="set them in site.toml",
        )
    source = check_source_available(config, cfg.data)  # a missing folder: exit 2, with the fix
    with Progress(transient=True, console=console) as bar:
        job = bar.add_task("scanning", total=None)
        result = scan_source(
            source,
            decode=decode,
            progress=lambda done, total, *_: bar.update(job, completed=done, total=total),
        )
    console.print(result.render_text(), highlight=False)
    out = report or Path(config).resolve().parent / "scan-report.json"
    result.write_json(out)
    console.print(f"report (counts only, no patient identifiers): {out}")


@app.command("peers")
def peers(
    config: ConfigOpt = Path("site.toml"),
    forget: Annotated[
        str | None,
        typer.Option("--forget", help="remove this peer's pinned identity key (it re-keyed)"),
    ] = None,
) -> None:
    """Peers' identity keys as this site last saw them, and its own fingerprint.

    The site daemon takes a peer's key only with the federation CA's certificate for it
    (and records it here); in-process simulation pins keys on first use.
    """
    from medfed.client.peer_pins import PINS_FILE, PeerPins
    from medfed.client.secure_site import load_identity
    from medfed.core.config import SiteConfig, load_toml
    from medfed.core.secagg import fingerprint

    cfg = load_toml(config, SiteConfig)
    site_dir = Path(config).resolve().parent  # the folder the site daemon uses
    pins = PeerPins(site_dir / PINS_FILE)
    if forget is not None:
        pin = pins.forget(forget)
        console.print(
            f"[green]forgot[/] {pin.site} ({pin.fingerprint}); the next run pins "
            "the key it then presents"
        )
        return
    own = fingerprint(load_identity(site_dir).public_bytes)
    console.print(
        f"this site {cfg.site.name!r}: {own}   (the coordinator's `medfed server "
        "enrol` prints the fingerprint it certified: they must match)"
    )
    console.print(f"pinned peers: {pins.path}", highlight=False)
    pinned = pins.load()
    if not pinned:
        console.print("no peer pinned yet: peers are pinned at the first secure round")
        return
    table = Table("peer", "fingerprint", "first seen", "run")
    for pin in sorted(pinned.values(), key=lambda p: p.site):
        table.add_row(pin.site, pin.fingerprint, pin.first_seen[:19], pin.run_id)
    console.print(table)


@app.command("dashboard")
def dashboard(
    config: ConfigOpt = Path("site.toml"),
    host: Annotated[
        str, typer.Option(help="loopback address to listen on (the page is this machine's only)")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="port to listen on (0: a free one)")] = 8471,
) -> None:
    """Serve the site's own read-only page: what left the site, budget, refusals, data scan.

    Counts, sizes, hashes and rules only: no patient identifier is shown.
    """
    from medfed.client.site_dashboard import SiteDashboard, site_bind
    from medfed.client.site_view import SiteView
    from medfed.core.web import Dashboard

    view = SiteView(config)
    server = Dashboard(
        site_bind(host, port), SiteDashboard(view), where="medfed site dashboard"
    ).open()
    console.print(
        f"[green]site dashboard[/] of {view.cfg.site.name!r}: {server.url}  (Ctrl-C stops it)"
    )
    signal.signal(signal.SIGTERM, interrupt_on_signal)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        console.print("dashboard stopped")
