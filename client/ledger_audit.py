"""The privacy ledger checked against the audit log, and rebuilt from it.

Every spend the worker reserves is audited (``privacy-reserved``) before training, and
every update sent names its ledger and spend record (``update-sent``); the audit log
also names the site's current ledger (``ledger-created`` / ``-adopted`` / ``-rebuilt``).
:func:`check_ledger` compares the two before every DP round: a ledger that is missing,
is not the one the audit log names, or holds less than it records cannot be trusted
(:class:`LedgerUntrusted`). :func:`build_from_audit` makes a new ledger from the audit
log (`medfed site budget --rebuild-from-audit`), conservatively: every audited
reservation counts as spent.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medfed.client.ledger import (
    _MATCH_SLACK,
    LedgerMismatch,
    LedgerMissing,
    PrivacyLedger,
    _build,
    _now,
)
from medfed.core.privacy import DatasetBudget

#: Audit events that name the site's current ledger (its ``ledger_id``).
LEDGER_EVENTS = ("ledger-created", "ledger-adopted", "ledger-rebuilt")


def _key(run_id: Any, rnd: Any, dataset: Any) -> tuple[str, int, str]:
    return str(run_id), int(rnd), str(dataset)


def _spend_of_record(record: Mapping[str, Any]) -> tuple[tuple[Any, Any], dict[str, Any]] | None:
    """The spend an audit record reports: ((ledger id, record id), fields), or None.

    ``privacy-reserved`` (before training) and ``update-sent`` (its ``privacy``) name the
    same reservation by ledger id and record id; logs written before reservations were
    audited have only ``update-sent``, without ids.
    """
    event = record.get("event")
    try:
        if event == "privacy-reserved":
            entry = {k: v for k, v in record.items() if k not in ("status", "committed_at")}
            rid = (record.get("ledger_id"), record.get("record"))
        elif (
            event == "update-sent"
            and isinstance(record.get("privacy"), dict)
            and "epsilon_round" in record["privacy"]
        ):
            p = record["privacy"]
            mode = str(p.get("mode", "sample"))
            entry = {
                "run_id": record.get("run_id"),
                "round": record.get("round"),
                "dataset": p.get("dataset"),
                "mode": mode,
                "epsilon": p["epsilon_round"],
                "delta": p.get("delta"),
                "accountant": p.get("accountant", "rdp"),
                "noise_multiplier": p.get("noise_multiplier", 0.0),
                "sample_rate": p.get("sample_rate", 0.0),
                "steps": p.get("steps", 0),
                "unit": "site" if mode == "update" else p.get("unit", "sample"),
                "status": "committed",
                "committed_at": record.get("time"),
            }
            rid = (p.get("ledger_id"), p.get("ledger_record"))
        else:
            return None
        _key(entry["run_id"], entry["round"], entry["dataset"])
        entry["epsilon"] = float(entry["epsilon"])
        if not entry.get("history"):  # one round's accountant entry, as the ledger planned it
            z, q, s = (
                float(entry["noise_multiplier"]),
                float(entry["sample_rate"]),
                int(entry["steps"]),
            )
            # update-level DP: one Gaussian mechanism per round, whatever SGD ran
            entry["history"] = [[z, q, s] if entry["mode"] == "sample" else [z, 1.0, 1]]
        float(entry["delta"])
    except (KeyError, TypeError, ValueError):
        return None  # not a spend this code can read: an edited line (verify tells)
    entry["reserved_at"] = entry.get("reserved_at") or record.get("time")
    return rid, entry


@dataclass
class AuditedSpends:
    """What a site's audit log says its ledger must hold; fed one record at a time."""

    #: The ledger the audit log names last (created, adopted or rebuilt), and by which event.
    ledger_id: str | None = None
    named_by: str = ""
    #: Audited epsilon per (run, round, dataset); each reservation counted once.
    spends: dict[tuple[str, int, str], float] = field(default_factory=dict)
    _counted: set[tuple[Any, Any]] = field(default_factory=set, repr=False)

    @classmethod
    def of(cls, records: Iterable[Mapping[str, Any]]) -> AuditedSpends:
        """Read a whole audit log."""
        out = cls()
        for record in records:
            out.add(record)
        return out

    def add(self, record: Mapping[str, Any]) -> None:
        """Take one audit record into account."""
        if record.get("event") in LEDGER_EVENTS and record.get("ledger_id"):
            self.ledger_id = str(record["ledger_id"])
            self.named_by = f"{record['event']} record of {record.get('time', '?')}"
            return
        spend = _spend_of_record(record)
        if spend is None:
            return
        rid, entry = spend
        if rid[1] is not None:
            if rid in self._counted:
                return
            self._counted.add(rid)
        key = _key(entry["run_id"], entry["round"], entry["dataset"])
        self.spends[key] = self.spends.get(key, 0.0) + entry["epsilon"]

    def per_dataset(self) -> dict[str, float]:
        """Audited epsilon per dataset."""
        out: dict[str, float] = {}
        for (_, _, dataset), eps in self.spends.items():
            out[dataset] = out.get(dataset, 0.0) + eps
        return out


def check_ledger(
    path: Path, audited: AuditedSpends, *, config: str | Path | None = None
) -> PrivacyLedger | None:
    """The ledger at ``path`` if it holds every spend the audit log records; else raise.

    Returns None when there is no ledger and the audit log neither names one nor records
    a spend (a site that has not spent yet: a new ledger may be made). Raises
    :class:`LedgerMissing`, :class:`LedgerMismatch` (another identity than the audit log
    names, or less epsilon for some run, round and dataset) or :class:`LedgerDamaged`,
    each with the rebuild fix. Reads only: never creates, adopts or repairs.
    """
    path = Path(path)
    if not path.exists():
        if audited.ledger_id is None and not audited.spends:
            return None
        said = (
            [f"names ledger {audited.ledger_id} ({audited.named_by})"] if audited.ledger_id else []
        )
        if audited.spends:
            per = ", ".join(
                f"{d}: epsilon {e:.4g}" for d, e in sorted(audited.per_dataset().items())
            )
            said.append(f"records DP spends ({per})")
        raise LedgerMissing(
            f"The privacy ledger is missing, but the audit log {' and '.join(said)}: a new, "
            "empty ledger would forget those spends.",
            where=str(path),
            config=config,
            expected="the ledger the audit log names",
        )
    ledger = PrivacyLedger(path, create=False, config=config)
    ledger.integrity()
    if audited.ledger_id is not None and ledger.ledger_id != audited.ledger_id:
        raise LedgerMismatch(
            f"The privacy ledger was replaced: the file is ledger {ledger.ledger_id}, but the "
            f"audit log's {audited.named_by} names {audited.ledger_id} (another site's ledger, "
            "or a copy?).",
            where=str(path),
            config=config,
            expected=f"ledger {audited.ledger_id}",
        )
    totals = ledger.spend_totals()
    short = sorted(
        (key, eps, totals.get(key, 0.0))
        for key, eps in audited.spends.items()
        if totals.get(key, 0.0) < eps - _MATCH_SLACK * max(1.0, abs(eps))
    )
    if short:
        (run, rnd, dataset), eps, held = short[0]
        raise LedgerMismatch(
            f"The privacy ledger holds less epsilon than the audit log records as spent, "
            f"for {len(short)} round(s) (e.g. run {run!r} round {rnd} on dataset {dataset!r}: "
            f"ledger {held:.4g}, audit log {eps:.4g}): an older copy of the ledger, or one "
            "edited?",
            where=str(path),
            config=config,
            expected="at least every audited spend in the ledger",
        )
    return ledger


@dataclass(frozen=True)
class RestoredDataset:
    """What a rebuilt ledger holds for one dataset."""

    dataset: str
    epsilon: float
    runs: int
    rounds: int
    unsent: int  # reservations with no update-sent record: counted as spent


@dataclass(frozen=True)
class RebuildResult:
    """What :func:`build_from_audit` restored."""

    ledger_id: str
    datasets: list[RestoredDataset]
    holds: list[tuple[str, str, float]]  # (run, dataset, epsilon) of live holds restored
    #: Spends read from update-sent records of logs older than audited reservations.
    legacy: int


def build_from_audit(
    path: Path, records: Iterable[Mapping[str, Any]], *, budgets: Mapping[str, DatasetBudget]
) -> RebuildResult:
    """Make a new ledger at ``path`` (absent) holding every spend the audit log records.

    Conservative: every audited reservation counts as spent, sent or not. Each spend keeps
    its audited epsilon, delta, accountant, noise, sample rate, steps, unit and mode; each
    run's accountant history is rebuilt from the rounds' entries, so its later rounds
    compose as before; holds that were not released and have not expired come back.
    """
    rows: list[dict[str, Any]] = []
    by_id: dict[tuple[Any, Any], dict[str, Any]] = {}
    holds: dict[tuple[str, str], Mapping[str, Any]] = {}
    legacy = 0
    for record in records:
        event = record.get("event")
        if event == "privacy-hold":
            holds[(str(record.get("run_id")), str(record.get("dataset")))] = record
            continue
        if event == "privacy-hold-released":
            holds = {k: v for k, v in holds.items() if k[0] != str(record.get("run_id"))}
            continue
        spend = _spend_of_record(record)
        if spend is None:
            continue
        rid, entry = spend
        if rid[1] is not None and rid in by_id:
            if event == "update-sent":  # the reservation was sent (again, if resent)
                row = by_id[rid]
                resent = row["status"] == "committed"
                row.update(
                    status="committed",
                    committed_at=row.get("committed_at") or record.get("time"),
                    resent=row.get("resent", 0) + resent,
                )
            continue
        row = {"status": "reserved", "committed_at": None, **entry}
        legacy += event == "update-sent"
        rows.append(row)
        if rid[1] is not None:
            by_id[rid] = row
    now = _now()
    live = [h for h in holds.values() if str(h.get("expires", "")) > now]

    def fill(con: sqlite3.Connection) -> None:
        histories: dict[tuple[str, str], tuple[str, float, list[list[float]]]] = {}
        for row in rows:
            run_id, dataset = str(row["run_id"]), str(row["dataset"])
            con.execute(
                "INSERT INTO spends (run_id, round, dataset, mode, epsilon, delta, accountant, "
                "noise_multiplier, sample_rate, steps, unit, status, reserved_at, committed_at, "
                "resent) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    run_id,
                    int(row["round"]),
                    dataset,
                    str(row["mode"]),
                    row["epsilon"],
                    float(row["delta"]),
                    str(row["accountant"]),
                    float(row["noise_multiplier"]),
                    float(row["sample_rate"]),
                    int(row["steps"]),
                    str(row["unit"]),
                    row["status"],
                    _seconds(row["reserved_at"]) or now,
                    _seconds(row["committed_at"]),
                    int(row.get("resent", 0)),
                ),
            )
            acc, delta, history = histories.get(
                (run_id, dataset), (str(row["accountant"]), float(row["delta"]), [])
            )
            history += [[float(z), float(q), int(s)] for z, q, s in row["history"]]
            histories[(run_id, dataset)] = (acc, delta, history)
        for (run_id, dataset), (acc, delta, history) in histories.items():
            con.execute(
                "INSERT INTO histories (run_id, dataset, accountant, delta, history, "
                "updated) VALUES (?, ?, ?, ?, ?, ?)",
                (run_id, dataset, acc, delta, json.dumps(history), now),
            )
        for dataset in sorted({str(r["dataset"]) for r in rows} & set(budgets)):
            con.execute(
                "INSERT INTO budgets (dataset, epsilon_max, delta, updated) VALUES (?, ?, ?, ?)",
                (dataset, budgets[dataset].epsilon_max, budgets[dataset].delta, now),
            )
        for h in live:
            con.execute(
                "INSERT INTO holds (run_id, dataset, epsilon, rounds, round_timeout_s, "
                "created, expires) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    str(h["run_id"]),
                    str(h["dataset"]),
                    float(h["epsilon"]),
                    int(h.get("rounds", 1)),
                    float(h.get("round_timeout_s", 600.0)),
                    _seconds(h.get("time")) or now,
                    str(h["expires"]),
                ),
            )
        con.execute("INSERT INTO meta (key, value) VALUES ('rebuilt_from_audit', ?)", (now,))

    ledger_id = _build(Path(path), fill)
    restored = []
    for dataset in sorted({str(r["dataset"]) for r in rows}):
        mine = [r for r in rows if str(r["dataset"]) == dataset]
        restored.append(
            RestoredDataset(
                dataset,
                math.fsum(r["epsilon"] for r in mine),
                len({str(r["run_id"]) for r in mine}),
                len(mine),
                sum(r["status"] == "reserved" for r in mine),
            )
        )
    return RebuildResult(
        ledger_id,
        restored,
        [(str(h["run_id"]), str(h["dataset"]), float(h["epsilon"])) for h in live],
        legacy,
    )


def _seconds(iso: Any) -> str | None:
    """An audit time (microseconds) as the ledger writes times (seconds, UTC)."""
    if iso is None:
        return None
    try:
        return (
            dt.datetime.fromisoformat(str(iso))
            .astimezone(dt.timezone.utc)
            .isoformat(timespec="seconds")
        )
    except ValueError:
        return _now()
