"""report.md: a run told in one page, for the coordinator and whoever they answer to.

Made from the run folder alone (run.json, summary.json, metrics.jsonl, events.jsonl,
cross_site.json), so it can be written again at any time: what was trained, how it
was protected, what each site's data gave and what it cost each site in epsilon,
round by round, and which sites refused or failed and why.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from medfed.core import wire
from medfed.core.files import atomic_write
from medfed.core.html_report import render_html
from medfed.core.run_summary import RunSummary
from medfed.core.runs import RunFolder
from medfed.core.schema import EPSILON_RUN_KEY, PrivacyReport


def _cell(value: Any, digits: int = 4) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.4e}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(_cell(v) for v in row) + " |" for row in rows),
    ]


def _privacy_lines(privacy: dict[str, Any]) -> list[str]:
    mode = privacy.get("mode", "off")
    if mode == "off":
        return ["- differential privacy: off"]
    noise = (
        f"target epsilon {privacy['target_epsilon']:g} (each site derives its noise)"
        if privacy.get("target_epsilon")
        else f"noise multiplier {privacy.get('noise_multiplier', 0):g}"
    )
    if mode == "sample":
        what = (
            f"DP-SGD, one {privacy.get('unit', 'sample')} protected; per-sample clipping "
            f"{privacy.get('max_grad_norm', 0):g}"
        )
    else:
        what = (
            f"update-level (a site's whole data protected); update clipping "
            f"{privacy.get('clipping_norm', 0):g}"
        )
    return [
        f"- differential privacy: {what}; {noise}; delta {privacy.get('target_delta', 0):g}; "
        f"{privacy.get('accountant', 'rdp')} accountant (Opacus)"
    ]


def _transport(summary: RunSummary | None) -> str:
    """How updates travelled: TLS in a deployment, in memory in a simulation."""
    if summary is not None and summary.protection is not None:
        transport = summary.protection.transport
    else:
        simulated = summary is not None and summary.engine == "simulation"
        transport = "in memory (simulation)" if simulated else "tls"
    return "TLS" if transport == "tls" else transport


def render(folder: RunFolder) -> str:
    """The report of the run in ``folder`` (markdown)."""
    info = folder.read_run()
    cfg: dict[str, Any] = info.get("config", {})
    summary = folder.read_summary()
    status = summary.status if summary is not None else "not finished"
    metrics = folder.read_metrics()
    events = folder.read_events()
    metric = (summary.primary_metric if summary is not None else None) or "dice"
    rounds = int(cfg.get("rounds", 0))
    lines = [
        f"# Run {info.get('run_id', folder.path.name)}: {cfg.get('task')} with "
        f"{cfg.get('strategy')}",
        "",
    ]
    options = ", ".join(f"{k}={v}" for k, v in sorted(cfg.get("strategy_options", {}).items()))
    if summary is not None and summary.rounds_finished is not None:
        finished = summary.rounds_finished
    elif status == "completed":
        finished = rounds
    else:
        finished = sum(e.is_("round-finished") for e in events)
    seconds = summary.seconds if summary is not None else None
    lines += [
        f"- status: **{status}**, {finished} of {rounds} rounds; "
        f"started {info.get('started', '?')[:19]} UTC"
        + (f", {seconds:.0f} s" if seconds is not None else ""),
        f"- strategy options: {options or 'defaults'}; adaptation hook: "
        f"{cfg.get('adaptation', 'none')}; seed {cfg.get('seed', 0)}",
        f"- initial model: {_initial_model(cfg)}",
        f"- transport: {_transport(summary)}; secure aggregation: "
        f"{cfg.get('secure_aggregation', 'default')}",
        *_privacy_lines(cfg.get("privacy", {})),
    ]
    if summary is not None and summary.simulation is not None:
        sim = summary.simulation
        lines.append(f"- engine: simulation ({sim.engine}) of {sim.sites} sites on one machine")
    lines += [
        f"- resumed after a server restart at round {e.get('round')} "
        f"({str(e.get('time', '?'))[:19]} UTC, server run {e.get('flower_run_id')}); "
        "the rounds before it were not redone"
        for e in folder.resumptions()
    ]
    if summary is not None and summary.reason:
        lines += ["", "## Why it ended", "", "```", summary.reason, "```"]

    if folder.cross_site_file.exists():
        row = json.loads(folder.cross_site_file.read_text())["matrix"].get("global", {})
        if row:
            lines += ["", f"## The final model at each site ({metric}, held-out split)", ""]
            sites = sorted(row)
            mean = sum(row[s].get(metric, 0.0) for s in sites) / len(sites)
            lines += _table(
                ["site", metric, "examples"],
                [[s, row[s].get(metric), row[s].get(wire.WEIGHT_KEY)] for s in sites]
                + [["mean", mean, ""]],
            )

    by_round: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for m in metrics:
        if m["phase"] == "train":
            by_round[m["round"]][m["site"]] = m
    sites_eps = sorted({s for r in by_round.values() for s, m in r.items() if EPSILON_RUN_KEY in m})
    if sites_eps:
        lines += [
            "",
            "## Privacy: epsilon spent by each site in this run, after each round",
            "",
            "(noise multiplier in brackets; a site's ledger holds its total over all "
            "runs: `medfed site budget`)",
            "",
        ]

        def spent(row: dict[str, dict[str, Any]], site: str) -> str:
            m = row.get(site, {})
            report = PrivacyReport.from_metrics(m)
            if report is None:
                return "-"
            return f"{report.epsilon_run:.4g} ({report.noise_multiplier:.3g})"

        lines += _table(
            ["round", *sites_eps],
            [[r, *(spent(by_round[r], s) for s in sites_eps)] for r in sorted(by_round)],
        )
    fitted = {
        e["site"]: e["metrics"][wire.FITTED_NOISE_KEY]
        for e in events
        if e.is_("site-replied")
        and e.get("phase") == "query"
        and wire.FITTED_NOISE_KEY in e.get("metrics", {})
    }
    if fitted:
        lines += [
            "",
            *(
                f"- {s} added more noise than the run asks (noise multiplier {z:.3g}) "
                "to fit the run into its remaining privacy budget (its policy's "
                "max_fitted_noise_multiplier)"
                for s, z in sorted(fitted.items())
            ),
        ]

    glob = {m["round"]: m for m in metrics if m["site"] == "global" and m["phase"] == "evaluate"}
    finished_ev = {e.round: e for e in events if e.is_("round-finished")}
    secagg = {e.round: e for e in events if e.is_("secure-aggregation")}
    if finished_ev:
        lines += ["", "## Rounds", ""]
        rows = []
        for r in sorted(finished_ev):
            e = finished_ev[r]
            trained = ", ".join(sorted(by_round.get(r, {}))) or "-"
            note = "no new model (lost round)" if e.get("model_unchanged") else ""
            if secagg.get(r, {}).get("dropped"):
                note = "without " + ", ".join(secagg[r]["dropped"])
            rows.append([r, glob.get(r, {}).get(metric), e.get("seconds"), trained, note])
        lines += _table(["round", f"global {metric}", "seconds", "sites trained", "note"], rows)

    lines += _missed_rounds(events, by_round, sorted(finished_ev))
    trouble = [e for e in events if e.is_("site-error")]
    if trouble:
        lines += ["", "## Refusals and failures", ""]
        lines += _table(
            ["round", "phase", "site", "status", "rule", "reason"],
            [
                [
                    e.round,
                    e.get("phase"),
                    e.get("site"),
                    e.get("status"),
                    e.get("rule", ""),
                    e.get("reason"),
                ]
                for e in trouble
            ],
        )
    warnings = [e["reason"] for e in events if e.is_("warning")]
    if warnings:
        lines += ["", "## Warnings", "", *(f"- {w}" for w in warnings)]
    model = summary.final_checkpoint if summary is not None else None
    lines += [
        "",
        "## Files",
        "",
        f"- model: `checkpoints/{model}`{_kept(folder, cfg)}"
        if model
        else "- model: none (no round finished)",
        "- per-site metrics per round: `metrics.jsonl`; progress: `events.jsonl`; "
        "plot: `metrics.png`; every site's score: `cross_site.json`",
        "",
    ]
    return "\n".join(lines)


def _kept(folder: RunFolder, cfg: dict[str, Any]) -> str:
    """The rounds the folder holds, where the run (``cfg``) kept only its last ones."""
    if int(cfg.get("keep_checkpoints", 0)) <= 0:
        return ""
    rounds = folder.saved_rounds()
    if not rounds:
        return ""
    return f" (rounds kept: {', '.join(map(str, rounds))}; keep_checkpoints)"


def _missed_rounds(
    events: list[dict[str, Any]], trained: dict[int, dict[str, Any]], rounds: list[int]
) -> list[str]:
    """Every finished round each site took no part in, with its reason when it gave one."""
    sites = sorted(
        {e["site"] for e in events if e.event in ("site-replied", "site-error") and e.get("site")}
    )
    why = {
        (e.round, e.get("site")): e
        for e in events
        if e.is_("site-error") and e.get("phase") == "train"
    }
    rows = []
    for site in sites:
        for r in rounds:
            if site in trained.get(r, {}):
                continue
            e = why.get((r, site))
            rows.append(
                [
                    site,
                    r,
                    (
                        f"{e.get('status')}"
                        + (f" ({e['rule']})" if e.get("rule") else "")
                        + f": {e.get('reason')}"
                    )
                    if e
                    else "no reply in time (or no update accepted)",
                ]
            )
    if not rows:
        return []
    return ["", "## Rounds each site missed", "", *_table(["site", "round", "why"], rows)]


def write_report(folder: RunFolder) -> Path:
    """Write ``report.md`` and ``report.html`` (atomically); return report.md's path.

    report.html holds the same text and the run's plot inline: one file to mail.
    """
    text = render(folder)
    atomic_write(folder.report_file, text.encode())
    title = text.splitlines()[0].lstrip("# ") if text else f"Run {folder.path.name}"
    page = render_html(text, title=title, images={"metrics.png": folder.plot_file})
    atomic_write(folder.html_report_file, page.encode())
    return folder.report_file


def _initial_model(cfg: dict[str, Any]) -> str:
    start = (
        "the task's public weights (pretrained on public data, no site's data)"
        if cfg.get("init_weights") == "public"
        else "random (seeded)"
    )
    if cfg.get("init_from"):
        return f"shared part from run {cfg['init_from']}; site-local part {start}"
    return start
