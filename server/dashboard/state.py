"""What the coordinator dashboard shows, read where `medfed runs`, `status`, `server sites` read.

No second source of truth: sites come from the federation's enrolment registry
(:meth:`Federation.enrolled`) and the SuperLink's node records (the Control API, as
`medfed server sites`), a site's medfed version from the ``site-version`` events its
replies left in the run folders (the latest); runs from their run folders
(:mod:`medfed.core.runs`: run.json, events.jsonl, summary.json, checkpoints/) and, for
a run without a summary, the SuperLink's own status (as `medfed runs`).

Polling 50 runs of 100 rounds must stay cheap: a run folder is parsed again only
when one of its files changed (mtime and size), and the overview reads only the
events it shows, skipping every site's per-round reply line (the bulk of
events.jsonl) before it is decoded. Per-round per-site metrics (metrics.jsonl) are
read for one run, when its page asks.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.common.constant import (
    HEARTBEAT_DEFAULT_INTERVAL,
    HEARTBEAT_MAX_INTERVAL,
    HEARTBEAT_PATIENCE,
)

from medfed.core.errors import MedfedError
from medfed.core.run_summary import RunEvent, RunSummary
from medfed.core.runs import RunFolder, list_runs
from medfed.core.schema import EPSILON_RUN_KEY, WEIGHT_KEY

#: Flower marks a node offline once it missed its heartbeats for this long (the
#: SuperNode's heartbeat interval, 30 s by default, a site's ``heartbeat_interval_s``,
#: times the SuperLink's patience, 2); a site that signs off (a clean stop) is offline
#: at once.
OFFLINE_AFTER_S = float(HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL)

#: Events the overview shows; the rest (every site's reply, mostly) is never decoded.
_SKIPPED = (b'"event": "site-replied"', b'"event": "round-sent"')


@dataclass(frozen=True)
class SiteRow:
    """One enrolled site and what the SuperLink knows of it."""

    name: str
    fingerprint: str
    enrolled: str
    #: online, offline, never connected, or unknown (the server did not answer)
    status: str
    #: Its last heartbeat (online) or when it went offline; "" if never.
    last_seen: str = ""
    #: The medfed version of its latest reply in any run ("": none reported).
    version: str = ""


@dataclass(frozen=True)
class SitesView:
    """The sites table, and why the server's view is missing if it is."""

    rows: list[SiteRow]
    #: "" when the SuperLink answered; else what was wrong (its fix included).
    server_problem: str = ""
    offline_after_s: float = OFFLINE_AFTER_S

    @property
    def online(self) -> int:
        """How many sites are online."""
        return sum(r.status == "online" for r in self.rows)


@dataclass(frozen=True)
class RunRow:
    """One run, as the overview shows it."""

    run_id: str
    task: str
    strategy: str
    started: str
    #: completed, refused, failed, stopped (its summary); running; or the SuperLink's word
    status: str
    rounds: int | None
    rounds_finished: int
    resumed_at: list[int] = field(default_factory=list)
    #: site -> (rule, reason) of each site that refused
    refusals: dict[str, tuple[str, str]] = field(default_factory=dict)
    reason: str = ""
    #: The last secure-aggregation round: (round, survivors, dropped)
    secagg: tuple[int, list[str], list[str]] | None = None
    checkpoints: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Parsed:
    """What one run folder's files say, kept until one of them changes."""

    run: dict[str, Any]
    summary: RunSummary | None
    events: list[RunEvent]
    checkpoints: list[str]


def _stamp(*paths: Path) -> tuple[tuple[int, int], ...]:
    out = []
    for p in paths:
        try:
            st = p.stat()
            out.append((st.st_mtime_ns, st.st_size))
        except FileNotFoundError:
            out.append((0, -1))
    return tuple(out)


def _overview_events(path: Path) -> list[RunEvent]:
    """The events of events.jsonl the overview needs, typed; a torn line is skipped."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    out = []
    for line in data.splitlines():
        if not line or any(s in line for s in _SKIPPED):
            continue
        try:
            event = RunEvent.parse(json.loads(line))
        except json.JSONDecodeError:
            continue
        if event is not None:
            out.append(event)
    return out


class RunFolders:
    """The run folders of a federation, parsed once per change (thread-safe)."""

    def __init__(self, runs_dir: Path) -> None:
        self.runs_dir = Path(runs_dir)
        self._lock = threading.Lock()
        self._parsed: dict[str, tuple[tuple[tuple[int, int], ...], _Parsed]] = {}
        self._metrics: dict[str, tuple[tuple[tuple[int, int], ...], dict[str, Any]]] = {}

    def folder(self, run_id: str) -> RunFolder | None:
        """The folder of run ``run_id`` (a name under the runs folder, nothing else)."""
        if not run_id.isdigit():
            return None
        folder = RunFolder(self.runs_dir / run_id)
        return folder if folder.run_file.is_file() else None

    def parsed(self, folder: RunFolder) -> _Parsed:
        """run.json, summary.json, the overview's events and the checkpoints of ``folder``."""
        ckpt = folder.path / "checkpoints"
        key = _stamp(folder.run_file, folder.events_file, folder.summary_file, ckpt)
        with self._lock:
            hit = self._parsed.get(folder.path.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        summary = None
        try:
            summary = folder.read_summary()
        except MedfedError:
            summary = None  # a damaged summary: the events still tell the run
        parsed = _Parsed(
            run=folder.read_run(),
            summary=summary,
            events=_overview_events(folder.events_file),
            # in round order (by name, round-1000 would come before round-999)
            checkpoints=[folder.checkpoint_file(r).name for r in folder.saved_rounds()],
        )
        with self._lock:
            self._parsed[folder.path.name] = (key, parsed)
        return parsed

    def rows(self, flower_status: dict[str, str] | None = None) -> list[RunRow]:
        """Every run, newest first; ``flower_status``: the SuperLink's word per run id."""
        return [self.row(f, flower_status or {}) for f in list_runs(self.runs_dir)]

    def row(self, folder: RunFolder, flower_status: dict[str, str]) -> RunRow:
        """One run's row."""
        p = self.parsed(folder)
        cfg = p.run.get("config", {})
        finished = [e.round for e in p.events if e.is_("round-finished") and e.round is not None]
        resumed = [int(e.round or 0) for e in p.events if e.is_("run-resumed")]
        refusals = {
            str(e["site"]): (str(e.get("rule", "")), str(e.get("reason", "")))
            for e in p.events
            if e.is_("site-error") and e.get("status") == "refused" and "site" in e
        }
        secagg = None
        for e in p.events:
            if e.is_("secure-aggregation"):
                secagg = (
                    int(e.round or 0),
                    list(e.get("survivors", [])),
                    list(e.get("dropped", [])),
                )
        reason = ""
        if p.summary is not None:
            status = p.summary.status
            reason = p.summary.reason or ""
            for site, r in (p.summary.refusals or {}).items():
                refusals[site] = (r.rule, r.reason)
        elif folder.is_running():
            status = "running"
        else:
            attempts = [folder.path.name] + [
                str(e["flower_run_id"]) for e in p.events if e.is_("run-resume-submitted")
            ]
            status = flower_status.get(attempts[-1], "not finished")
        return RunRow(
            run_id=folder.path.name,
            task=str(cfg.get("task", "")),
            strategy=str(cfg.get("strategy", "")),
            started=str(p.run.get("started", ""))[:19].replace("T", " "),
            status=status,
            rounds=cfg.get("rounds"),
            rounds_finished=len(set(finished)),
            resumed_at=resumed,
            refusals=refusals,
            reason=reason,
            secagg=secagg,
            checkpoints=p.checkpoints,
        )

    def site_versions(self) -> dict[str, str]:
        """Each site's medfed version, as it reported it last in any run (``site-version``)."""
        latest: dict[str, tuple[str, str]] = {}  # site -> (time, version)
        for folder in reversed(list(list_runs(self.runs_dir))):  # oldest first: ties go later
            for e in self.parsed(folder).events:
                if e.is_("site-version") and isinstance(e.get("site"), str):
                    seen = latest.get(e["site"])
                    if seen is None or e.time >= seen[0]:
                        latest[e["site"]] = (e.time, str(e.get("version", "")))
        return {site: version for site, (_, version) in latest.items()}

    def details(self, folder: RunFolder) -> dict[str, Any]:
        """One run's per-round charts: each metric per site, epsilon per site, secure aggregation.

        ``{"metrics": {"train"|"evaluate": {metric: {site: [[round, value], ...]}}},
        "epsilon": {site: [[round, epsilon], ...]}, "secagg": [[round, survivors, dropped]]}``
        """
        key = _stamp(folder.metrics_file, folder.events_file)
        with self._lock:
            hit = self._metrics.get(folder.path.name)
        if hit is not None and hit[0] == key:
            return hit[1]
        series: dict[str, dict[str, dict[str, list[list[float]]]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(list))
        )
        epsilon: dict[str, list[list[float]]] = defaultdict(list)
        for m in folder.read_metrics():
            rnd, site, phase = m.get("round"), m.get("site"), m.get("phase")
            if not isinstance(rnd, int) or not isinstance(site, str) or not isinstance(phase, str):
                continue
            for name, value in m.items():
                if name in ("round", "site", "phase", WEIGHT_KEY) or isinstance(value, bool):
                    continue
                if not isinstance(value, int | float):
                    continue
                if name == EPSILON_RUN_KEY:
                    epsilon[site].append([rnd, value])
                else:
                    series[phase][name][site].append([rnd, value])
        p = self.parsed(folder)
        secagg = [
            [int(e.round or 0), list(e.get("survivors", [])), list(e.get("dropped", []))]
            for e in p.events
            if e.is_("secure-aggregation")
        ]
        out = {"metrics": series, "epsilon": epsilon, "secagg": secagg}
        out = json.loads(json.dumps(out))  # plain dicts, safe to share between threads
        with self._lock:
            self._metrics[folder.path.name] = (key, out)
        return out


def sites_view(
    enrolled: list[dict[str, str]],
    nodes: Callable[[], list[dict[str, Any]]],
    *,
    versions: dict[str, str] | None = None,
    now: Callable[[], float] = time.time,
) -> SitesView:
    """The enrolled sites with the SuperLink's status of each (``nodes``: Control.nodes).

    ``versions``: each site's reported medfed version (:meth:`RunFolders.site_versions`).
    """
    problem = ""
    by_key: dict[str, dict[str, Any]] = {}
    try:
        for node in nodes():
            by_key[bytes(node["public_key"]).decode().strip()] = node
    except MedfedError as exc:  # unreachable, or not this federation's server
        problem = exc.what + (f" ({exc.fix})" if exc.fix else "")
    rows = []
    for site in enrolled:
        node = by_key.get(site["public_key"].strip())
        if problem:
            status, seen = "unknown", ""
        elif node is None:
            status, seen = "never connected", ""
        else:
            status = str(node["status"])
            seen = _last_seen(node, now())
        rows.append(
            SiteRow(
                name=site["name"],
                fingerprint=site["fingerprint"],
                enrolled=site.get("enrolled", "")[:19].replace("T", " "),
                status=status,
                last_seen=seen,
                version=(versions or {}).get(site["name"], ""),
            )
        )
    return SitesView(rows, server_problem=problem, offline_after_s=_offline_after(by_key.values()))


def _offline_after(nodes: Iterable[dict[str, Any]]) -> float:
    """The longest time any connected site may stay silent before it counts as offline."""
    intervals = [float(n.get("heartbeat_interval") or 0) for n in nodes]
    declared = [i for i in intervals if 0 < i <= HEARTBEAT_MAX_INTERVAL]  # not a simulation's inf
    return HEARTBEAT_PATIENCE * max(declared) if declared else OFFLINE_AFTER_S


def _last_seen(node: dict[str, Any], now: float) -> str:
    """When the SuperLink last heard from a node, from its record.

    An online node's ``online_until`` is its last heartbeat plus patience × interval; an
    offline node's ``last_deactivated_at`` is when it signed off or timed out.
    """
    import datetime as dt

    if node.get("status") == "online" and node.get("online_until"):
        interval = float(node.get("heartbeat_interval") or HEARTBEAT_DEFAULT_INTERVAL)
        heard = min(float(node["online_until"]) - HEARTBEAT_PATIENCE * interval, now)
        stamp = dt.datetime.fromtimestamp(heard, dt.timezone.utc)
        return stamp.isoformat(timespec="seconds")[:19].replace("T", " ")
    when = str(node.get("last_deactivated_at") or node.get("last_activated_at") or "")
    return when[:19].replace("T", " ")
