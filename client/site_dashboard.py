"""The site's own read-only page (`medfed site dashboard`), served on loopback only.

``/`` the page, ``/api/site`` its poll (the same parts, re-rendered), ``/api/state``
the state as JSON. What it shows comes from :class:`medfed.client.site_view.SiteView`:
counts, sizes, hashes, rules; never a patient identifier.
"""

from __future__ import annotations

import datetime as dt
from html import escape
from typing import Any

from medfed.client.site_view import SiteState, SiteView
from medfed.core.errors import ConfigError
from medfed.core.web import Bind, Response, is_loopback


def site_bind(host: str, port: int) -> Bind:
    """The site page's address: loopback, whatever was asked (it is the site's own view)."""
    if not is_loopback(host):
        raise ConfigError(
            f"The site's dashboard is served on this machine only, not on {host}.",
            where="medfed site dashboard --host",
            expected="127.0.0.1, ::1 or localhost",
            fix="leave --host out; reach it from elsewhere through an SSH tunnel "
            "(ssh -L 8471:127.0.0.1:8471 site-host)",
        )
    return Bind(host, port)


def _num(v: float | None, digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _table(head: list[str], rows: list[list[str]], empty: str, ident: str = "") -> str:
    if not rows:
        return f"<p class=dim>{escape(empty)}</p>"
    th = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    idattr = f" id={ident}" if ident else ""
    return f"<table{idattr}><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def chain_html(s: SiteState) -> str:
    """The audit log's hash chain: intact or where it breaks."""
    c = s.chain
    if c["intact"]:
        torn = f"; {c['torn']} torn line(s) (a crash while writing)" if c["torn"] else ""
        head = (
            f"<p><span class='badge ok' id=chain-status>chain intact</span> {c['records']} "
            f"records; head seq {c['head_seq']}, <code>{escape(str(c['head'] or '')[:23])}</code>"
            f"{torn}</p>"
        )
    else:
        head = (
            f"<p><span class='badge bad' id=chain-status>chain broken</span> "
            f"{len(c['breaks'])} break(s): records were edited, inserted or deleted "
            "(`medfed site audit --verify`)</p>"
        )
        head += _table(
            ["line", "what"], [[str(b["line"]), escape(b["what"])] for b in c["breaks"]], ""
        )
    counts = ", ".join(f"{escape(k)} {v}" for k, v in sorted(s.events.items()))
    return head + f"<p class=dim>records by event: {counts or 'none'}</p>"


def sent_html(s: SiteState) -> str:
    """What left the site (newest first)."""
    rows = [
        [
            escape(x.time),
            escape(x.event),
            escape(x.run_id),
            "" if x.round is None else str(x.round),
            "-" if x.bytes is None else f"{x.bytes:,}",
            f"<code>{escape(x.hash)}</code>" if x.hash else "-",
            _num(x.epsilon_round),
            _num(x.epsilon_run),
        ]
        for x in s.sent
    ]
    total = f"<p>{len(s.sent)} replies shown, {s.sent_bytes:,} bytes in all left the site.</p>"
    return total + _table(
        ["time (UTC)", "what", "run", "round", "bytes", "SHA-256", "epsilon (round)", "(run)"],
        rows,
        "nothing has left the site yet",
        "sent-table",
    )


def budget_html(s: SiteState) -> str:
    """Privacy budget per dataset, and what each run spent."""
    b = s.budget
    ds = [
        [escape(d["dataset"]), _num(d["epsilon_max"]), _num(d["spent"]), _num(d["remaining"])]
        for d in b["datasets"]
    ]
    runs = [
        [
            escape(r["run_id"]),
            escape(r["dataset"]),
            _num(r["epsilon"]),
            f"{r['delta']:.1e}",
            str(r["rounds"]),
            escape(r["unit"] or ""),
            escape(r["last"]),
        ]
        for r in b["runs"]
    ]
    return _table(
        ["dataset", "epsilon max", "spent", "left"], ds, "no dataset budget", "budget-table"
    ) + _table(
        ["run", "dataset", "epsilon", "delta", "rounds", "protects", "last (UTC)"],
        runs,
        "no run has spent privacy budget yet",
    )


def refusals_html(s: SiteState) -> str:
    """The site's refusals, with the rule of site.toml that made each."""
    rows = [
        [
            escape(r.time),
            escape(r.run_id),
            "" if r.round is None else str(r.round),
            f"<code class=rule>{escape(r.rule)}</code>",
            escape(r.reason),
        ]
        for r in s.refusals
    ]
    return _table(
        ["time (UTC)", "run", "round", "rule", "reason"], rows, "no refusals", "refusals-table"
    )


def scan_html(s: SiteState) -> str:
    """The data scan's counts (no series or file ids)."""
    if s.scan is None:
        return "<p class=dim>no scan report yet: run `medfed site scan`</p>"
    c = s.scan
    reasons = ", ".join(f"{escape(k)}: {v}" for k, v in sorted(c["skipped_by_reason"].items()))
    mods = ", ".join(f"{escape(k)} {v}" for k, v in sorted(c["modalities"].items()))
    return (
        f"<p>{c['files_total']} files: {c['files_used']} used, {c['files_skipped']} skipped"
        f"{f' ({reasons})' if reasons else ''}; {c['series']} series ({mods or '-'}), "
        f"{c['labelled']} labelled.</p>"
    )


def parts(s: SiteState) -> dict[str, str]:
    """The page's sections by element id."""
    problems = "".join(f"<p class=bad>{escape(p)}</p>" for p in s.problems)
    return {
        "problems": problems,
        "chain": chain_html(s),
        "sent": sent_html(s),
        "budget": budget_html(s),
        "refusals": refusals_html(s),
        "scan": scan_html(s),
    }


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def page(s: SiteState, *, poll_s: float) -> str:
    """The whole page."""
    p = parts(s)
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>medfed site {escape(s.site)}</title>"
        "<link rel=stylesheet href=/static/dashboard.css>"
        "<script src=/static/federation.js defer></script></head>"
        f"<body data-poll='/api/site' data-every='{poll_s:g}'>"
        f"<header><h1>medfed site <i>{escape(s.site)}</i></h1><span class=dim>read-only, "
        f"this machine only; updated <span id=updated>{_now()}</span></span></header>"
        f"<section id=problems>{p['problems']}</section>"
        f"<h2>Audit log</h2><section id=chain>{p['chain']}</section>"
        f"<h2>What left the site</h2><section id=sent>{p['sent']}</section>"
        f"<h2>Privacy budget</h2><section id=budget>{p['budget']}</section>"
        f"<h2>Refusals</h2><section id=refusals>{p['refusals']}</section>"
        f"<h2>Data scan</h2><section id=scan>{p['scan']}</section></body></html>"
    )


class SiteDashboard:
    """The site page's app for :class:`medfed.core.web.Dashboard`."""

    def __init__(self, view: SiteView, *, poll_s: float = 2.0) -> None:
        self.view = view
        self.poll_s = poll_s

    def __call__(self, path: str, query: dict[str, str]) -> Response | None:
        """Answer one GET."""
        if path == "/":
            return Response(page(self.view.state(), poll_s=self.poll_s).encode())
        if path == "/api/site":
            body: dict[str, Any] = {"updated": _now(), "html": parts(self.view.state())}
            return Response.json(body)
        if path == "/api/state":
            return Response.json(self.view.state().to_json())
        return None
