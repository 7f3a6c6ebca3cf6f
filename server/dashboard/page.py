"""The coordinator's dashboard as HTML: the overview (sites, runs) and one run's page.

Rendered on the server; ``federation.js`` polls the JSON endpoints, swaps the tables
in place and draws the run's charts with uPlot (vendored, no request leaves the
machine). Every value from a file is escaped.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from medfed.server.dashboard.state import RunRow, SitesView

_BADGE = {
    "online": "ok",
    "completed": "ok",
    "running": "live",
    "offline": "bad",
    "refused": "bad",
    "failed": "bad",
    "stopped": "warn",
    "unknown": "warn",
    "never connected": "warn",
}


def _badge(status: str) -> str:
    return f"<span class='badge {_BADGE.get(status, 'warn')}'>{escape(status)}</span>"


def _head(title: str) -> str:
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        "<meta name=viewport content='width=device-width, initial-scale=1'>"
        f"<title>{escape(title)}</title>"
        "<link rel=stylesheet href=/static/uPlot.min.css>"
        "<link rel=stylesheet href=/static/dashboard.css>"
        "<script src=/static/uPlot.iife.min.js defer></script>"
        "<script src=/static/federation.js defer></script></head>"
    )


def now_utc() -> str:
    """Now, as the page shows it."""
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def sites_html(view: SitesView) -> str:
    """The sites table (and the server's problem, if it did not answer)."""
    note = ""
    if view.server_problem:
        note = (
            "<p class='bad' id=server-problem>The server's site status is unknown: "
            f"{escape(view.server_problem)}</p>"
        )
    rows = "".join(
        f"<tr data-site='{escape(r.name)}'><td>{escape(r.name)}</td>"
        f"<td class=status>{_badge(r.status)}</td><td>{escape(r.last_seen) or '-'}</td>"
        f"<td class=version>{escape(r.version) or '<span class=dim>not reported</span>'}</td>"
        f"<td>{escape(r.enrolled)}</td><td class=mono>{escape(r.fingerprint[:23])}</td></tr>"
        for r in view.rows
    )
    return (
        f"{note}<p><b id=online-count>{view.online}</b> of {len(view.rows)} enrolled sites "
        f"online. <span class=dim>A site that stops without signing off turns offline "
        f"once it missed its heartbeats for {view.offline_after_s:.0f} s (its "
        "heartbeat interval times Flower's patience, 2); a clean stop at once.</span></p>"
        "<table id=sites-table><thead><tr><th>site</th><th>status</th><th>last seen (UTC)"
        "</th><th>version</th><th>enrolled</th><th>fingerprint</th></tr></thead>"
        f"<tbody>{rows or '<tr><td colspan=6>no site enrolled</td></tr>'}</tbody></table>"
    )


def _notes(r: RunRow) -> str:
    parts = []
    if r.resumed_at:
        parts.append("resumed at round " + ", ".join(str(k) for k in r.resumed_at))
    for site, (rule, reason) in sorted(r.refusals.items()):
        parts.append(
            f"<span class=refusal>{escape(site)} refused: <code class=rule>{escape(rule)}</code>"
            f" {escape(reason)}</span>"
        )
    if r.reason and not r.refusals:
        parts.append(escape(r.reason))
    return "<br>".join(parts)  # each part escaped above


def _secagg(r: RunRow) -> str:
    if r.secagg is None:
        return "-"
    rnd, survivors, dropped = r.secagg
    text = f"round {rnd}: {len(survivors)} survived"
    if dropped:
        text += f", dropped {', '.join(dropped)}"
    return escape(text)


def _round(r: RunRow) -> str:
    return f"{r.rounds_finished}/{r.rounds if r.rounds is not None else '?'}"


def _checkpoint_link(r: RunRow) -> str:
    if not r.checkpoints:
        return "-"
    last = r.checkpoints[-1]
    return (
        f"<a href='/checkpoint/{escape(r.run_id)}/{escape(last)}' download>{escape(last)}</a>"
        f" <span class=dim>({len(r.checkpoints)})</span>"
    )


def runs_html(rows: list[RunRow]) -> str:
    """The runs table, newest first."""
    body = "".join(
        f"<tr data-run='{escape(r.run_id)}'><td><a href='/run/{escape(r.run_id)}'>"
        f"{escape(r.run_id)}</a></td><td class=status>{_badge(r.status)}</td>"
        f"<td class=round>{_round(r)}</td><td>{escape(r.task)}</td>"
        f"<td>{escape(r.strategy)}</td><td>{escape(r.started)}</td>"
        f"<td class=notes>{_notes(r)}</td><td>{_secagg(r)}</td><td>{_checkpoint_link(r)}</td></tr>"
        for r in rows
    )
    return (
        "<table id=runs-table><thead><tr><th>run</th><th>status</th><th>round</th>"
        "<th>task</th><th>strategy</th><th>started (UTC)</th><th>resumed, refused, why</th>"
        "<th>secure aggregation</th><th>checkpoint</th></tr></thead>"
        f"<tbody>{body or '<tr><td colspan=9>no runs yet</td></tr>'}</tbody></table>"
    )


def overview(name: str, sites: SitesView, rows: list[RunRow], *, poll_s: float) -> str:
    """The dashboard's front page."""
    return (
        _head(f"medfed: {name}") + f"<body data-poll='/api/overview' data-every='{poll_s:g}'>"
        f"<header><h1>medfed federation <i>{escape(name)}</i></h1>"
        f"<span class=dim>read-only; updated <span id=updated>{now_utc()}</span></span></header>"
        f"<h2>Sites</h2><section id=sites>{sites_html(sites)}</section>"
        f"<h2>Runs</h2><section id=runs>{runs_html(rows)}</section></body></html>"
    )


def overview_json(sites: SitesView, rows: list[RunRow]) -> dict[str, Any]:
    """What the overview's poll swaps in."""
    return {
        "updated": now_utc(),
        "html": {"sites": sites_html(sites), "runs": runs_html(rows)},
        "online": sites.online,
        "runs": [
            {"run_id": r.run_id, "status": r.status, "round": r.rounds_finished, "of": r.rounds}
            for r in rows
        ],
    }


def run_head(r: RunRow) -> str:
    """One run's facts and its checkpoints."""
    links = " ".join(
        f"<a href='/checkpoint/{escape(r.run_id)}/{escape(c)}' download>{escape(c)}</a>"
        for c in r.checkpoints
    )
    return (
        f"<table><tr><th>status</th><td class=status>{_badge(r.status)}</td></tr>"
        f"<tr><th>round</th><td class=round>{_round(r)}</td></tr>"
        f"<tr><th>task, strategy</th><td>{escape(r.task)}, {escape(r.strategy)}</td></tr>"
        f"<tr><th>started (UTC)</th><td>{escape(r.started)}</td></tr>"
        f"<tr><th>resumed, refused, why</th><td class=notes>{_notes(r) or '-'}</td></tr>"
        f"<tr><th>secure aggregation</th><td>{_secagg(r)}</td></tr>"
        f"<tr><th>checkpoints</th><td>{links or '-'}</td></tr>"
        f"<tr><th>report</th><td><a href='/report/{escape(r.run_id)}'>report.html</a>"
        "</td></tr></table>"
    )


def run_page(r: RunRow, *, poll_s: float) -> str:
    """One run: its facts, then per-round per-site charts, epsilon and secure aggregation."""
    return (
        _head(f"medfed run {r.run_id}")
        + f"<body data-poll='/api/run/{escape(r.run_id)}' data-every='{poll_s:g}'>"
        f"<header><h1><a href='/'>medfed</a> run {escape(r.run_id)}</h1>"
        f"<span class=dim>read-only; updated <span id=updated>{now_utc()}</span></span></header>"
        f"<section id=head>{run_head(r)}</section>"
        "<h2>Per round, per site</h2><section id=charts></section>"
        "<h2>Epsilon per site per round</h2><section id=epsilon><p class=dim>no DP in this "
        "run (or no round yet)</p></section>"
        "<h2>Secure aggregation: survivors and dropouts</h2><section id=secagg></section>"
        "</body></html>"
    )
