"""The site's privacy ledger: every epsilon a dataset spends, across runs and coordinators.

SQLite (stdlib), WAL journal, ``synchronous = FULL``: a committed transaction is
on disk before the call returns. One file per site; rows per dataset.

Lifecycle of a round (the worker's order):

1. :meth:`PrivacyLedger.reserve` BEFORE training: in one ``BEGIN IMMEDIATE``
   transaction it computes the round's epsilon from the run's persisted
   accountant history plus the round's planned history, refuses with
   :class:`BudgetExceeded` if spent + asked > ``epsilon_max``, else writes a
   ``reserved`` spend record and the run's extended history.
2. Train, clip/noise, encrypt, audit.
3. :meth:`PrivacyLedger.commit` once the reply is ready to leave.

Conservative choice: a ``reserved`` record counts as spent, forever. A crash
after training and before sending, or a refused reply after training, may
over-count; it never under-counts (the noised update may have been computed and
might have left). Retrying a round reserves again: fresh noise is a fresh release.

Composition. Within one run on one dataset, the run's epsilon is the accountant's
epsilon over the run's whole history (RDP/PRV composition, tighter than adding
per-round epsilons); each round records its increment
``eps(history + round) - eps(history)``, so the records of a run sum to the
run's epsilon. Across different runs on the same dataset epsilons add (basic
composition); the deltas add too: ``k`` runs at delta ``d`` give ``k * d``.

Units. Each record says what its epsilon protects (``unit``: a sample, a scan, a
patient, or ``site`` for update-level DP). Epsilons of different units do not add
up to a bound on the coarser one (a slice-level epsilon says little about a
patient), so a dataset whose policy now asks for a coarser ``privacy_unit`` than
some earlier spend protected is refused: its budget at that unit cannot be certified.

Bound to the audit log. Each ledger has an identity (``ledger_id``, made with the
file) that the site's audit log names when the ledger is created, adopted or rebuilt;
every reservation is audited (``privacy-reserved``) before training.
:mod:`medfed.client.ledger_audit` compares the two: a missing ledger while the audit
log names one or records spends, a ledger of another identity (replaced), a ledger
holding less epsilon for some (run, round, dataset) than the audit log records (an
older copy), or an unreadable file raises a :class:`LedgerUntrusted` whose fix is
``medfed site budget --rebuild-from-audit`` (``build_from_audit``). A ledger holding
MORE than the audit log is normal (a crash between reserving and auditing). Nothing
here ever makes a fresh, empty ledger where an existing one was expected: opening a
ledger that is gone fails (``mode=rw``) instead of creating an empty file.

Holds (admission of concurrent runs). When a site joins a run under secure
aggregation it holds the epsilon the run plans to spend on the dataset
(:meth:`PrivacyLedger.hold`). Checks for OTHER runs count what each live hold has not
yet spent as spent; a run's own rounds draw down from its hold. A hold ends with the
run (:meth:`PrivacyLedger.release`), or expires (:func:`hold_ttl`: twice the run's
round timeout per remaining round, at least an hour and at most a week; each round of
the run renews it), so a run that never ended does not block the dataset for ever.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.core.errors import MedfedError
from medfed.core.privacy import DatasetBudget, unit_covers
from medfed.core.privacy_accounting import HistoryEntry, epsilon_of_history

_SCHEMA = """
CREATE TABLE IF NOT EXISTS budgets (
    dataset      TEXT PRIMARY KEY,
    epsilon_max  REAL NOT NULL,
    delta        REAL NOT NULL,
    updated      TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS spends (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id           TEXT NOT NULL,
    round            INTEGER NOT NULL,
    dataset          TEXT NOT NULL,
    mode             TEXT NOT NULL,
    epsilon          REAL NOT NULL,
    delta            REAL NOT NULL,
    accountant       TEXT NOT NULL,
    noise_multiplier REAL NOT NULL,
    sample_rate      REAL NOT NULL,
    steps            INTEGER NOT NULL,
    unit             TEXT NOT NULL DEFAULT 'sample',
    status           TEXT NOT NULL CHECK (status IN ('reserved', 'committed')),
    reserved_at      TEXT NOT NULL,
    committed_at     TEXT,
    resent           INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS spends_dataset ON spends (dataset);
CREATE TABLE IF NOT EXISTS histories (
    run_id      TEXT NOT NULL,
    dataset     TEXT NOT NULL,
    accountant  TEXT NOT NULL,
    delta       REAL NOT NULL,
    history     TEXT NOT NULL,
    updated     TEXT NOT NULL,
    PRIMARY KEY (run_id, dataset)
);
CREATE TABLE IF NOT EXISTS meta (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    run_id          TEXT NOT NULL,
    dataset         TEXT NOT NULL,
    epsilon         REAL NOT NULL,
    rounds          INTEGER NOT NULL,
    round_timeout_s REAL NOT NULL,
    created         TEXT NOT NULL,
    expires         TEXT NOT NULL,
    PRIMARY KEY (run_id, dataset)
);
"""


class LedgerError(MedfedError):
    """The privacy ledger cannot record or confirm a spend; the reply is blocked."""


def rebuild_fix(config: str | Path | None = None) -> str:
    """The command that restores a ledger from the audit log."""
    return (
        f"restore it from the audit log: medfed site budget --config {config or 'site.toml'} "
        "--rebuild-from-audit (a damaged file is kept aside, never deleted)"
    )


class LedgerUntrusted(LedgerError):
    """The ledger cannot be trusted to hold every audited spend: every DP round is refused.

    Never a silent reset: until the ledger is restored (:func:`rebuild_fix`), the site
    refuses DP rounds and DP joins; runs without DP go on.
    """

    def __init__(
        self, what: str, *, where: str, config: str | Path | None = None, expected: str = ""
    ) -> None:
        self.problem = what  # what happened, without the consequence
        super().__init__(
            what + " Every DP round is refused until it is restored.",
            where=where,
            expected=expected,
            fix=rebuild_fix(config),
        )


class LedgerMissing(LedgerUntrusted):
    """The ledger file is gone although the audit log names one or records spends."""


class LedgerMismatch(LedgerUntrusted):
    """The ledger is not the one the audit log names, or holds less than it records."""


class LedgerDamaged(LedgerUntrusted):
    """The ledger file cannot be read (not a database, truncated, malformed)."""


class BudgetExceeded(LedgerError):
    """A round would take a dataset past its epsilon budget (other live runs' holds count)."""

    def __init__(
        self,
        *,
        dataset: str,
        spent: float,
        asked: float,
        budget: float,
        what: str = "this round",
        holds: Sequence[tuple[str, float]] = (),
    ) -> None:
        self.dataset, self.spent, self.asked, self.budget = dataset, spent, asked, budget
        self.holds = list(holds)  # (run id, epsilon it holds and has not spent yet)
        held = sum(e for _, e in self.holds)
        left = max(budget - spent - held, 0.0)
        holding = ""
        if self.holds:
            runs = ", ".join(f"run {r!r} holds {e:.4g}" for r, e in self.holds)
            holding = f" + held by other live runs {held:.4g} ({runs})"
        super().__init__(
            f"Privacy budget exceeded for dataset {dataset!r}: spent {spent:.4g}{holding} + "
            f"{what} {asked:.4g} > epsilon_max {budget:.4g} (remaining {left:.4g}).",
            where=f"privacy.datasets.{dataset}.epsilon_max",
            expected=f"{what} spending at most {left:.4g}",
            fix=f"the site refuses {what}; the coordinator may ask for fewer rounds, more "
            f"noise or a --target-epsilon of at most {left:.4g}"
            + (
                ", or wait until the other runs end (their holds: `medfed site budget`)"
                if self.holds
                else ""
            )
            + ", and only the site operator may raise epsilon_max",
        )


class UnitNotCovered(LedgerError):
    """Earlier spends on a dataset protected a finer unit than its policy now requires."""

    def __init__(self, *, dataset: str, required: str, finer: dict[str, int]) -> None:
        self.required, self.finer = required, finer
        held = ", ".join(f"{n} round(s) per {u}" for u, n in sorted(finer.items()))
        super().__init__(
            f"Dataset {dataset!r} must be protected per {required}, but the ledger holds "
            f"spends that protected less ({held}); their epsilon does not bound a whole "
            f"{required}, so this dataset's budget per {required} cannot be certified.",
            where=f"privacy.datasets.{dataset}.privacy_unit",
            expected=f"a dataset whose every spend protected at least a {required}",
            fix="the site refuses DP rounds on this dataset; only the site operator can "
            "return privacy_unit to what the earlier runs protected",
        )


class RunTargetExceeded(LedgerError):
    """A round would take a run past the epsilon it asked for (``privacy.target_epsilon``)."""

    def __init__(self, *, run_id: str, dataset: str, after: float, target: float) -> None:
        self.after, self.target = after, target
        super().__init__(
            f"Run {run_id!r} asked for at most epsilon {target:.4g} on dataset {dataset!r}; "
            f"this round would bring it to {after:.4g}.",
            where="privacy.target_epsilon of the run",
            expected="no more rounds than the run declared (its noise was set for them)",
            fix="the site refuses this round; start a new run for more rounds",
        )


#: Slack on a run's target epsilon: composing R rounds one by one may differ from the
#: R-round question the noise was derived from by rounding (PRV's discretization).
TARGET_SLACK = 1e-3

#: A join's hold on a dataset lasts this many round timeouts per remaining round ...
HOLD_TIMEOUTS_PER_ROUND = 2.0
#: ... but at least this long (seconds) ...
HOLD_MIN_S = 3600.0
#: ... and at most this long (seconds); each round of the run renews it.
HOLD_MAX_S = 7 * 24 * 3600.0
#: Relative slack when a ledger's spend is compared with the audited one (float sums).
_MATCH_SLACK = 1e-9


def hold_ttl(rounds_left: int, round_timeout_s: float) -> float:
    """Seconds a hold lasts: long enough for the run's remaining rounds at their timeout.

    A run that never ends (the server crashed, the coordinator gave up) stops blocking
    the dataset after this; a live run renews it with every round.
    """
    wanted = HOLD_TIMEOUTS_PER_ROUND * max(int(rounds_left), 0) * float(round_timeout_s)
    return min(max(wanted, HOLD_MIN_S), HOLD_MAX_S)


@dataclass(frozen=True)
class Hold:
    """The epsilon a joined run plans to spend on a dataset, kept from other runs."""

    run_id: str
    dataset: str
    epsilon: float  # the run's planned epsilon on the dataset, its spent rounds included
    outstanding: float  # of which not spent yet: what other runs cannot have
    rounds: int  # the rounds it covers (the run's rounds charged, then planned)
    created: str
    expires: str
    expired: bool


@dataclass(frozen=True)
class Reservation:
    """A reserved spend: the record to commit and the epsilons behind it."""

    record_id: int
    epsilon: float  # what this round adds
    run_epsilon: float  # the run's epsilon on this dataset, this round included
    spent: float  # the dataset's total, this round included
    remaining: float


@dataclass(frozen=True)
class SpendRecord:
    """One row of the ledger."""

    id: int
    run_id: str
    round: int
    dataset: str
    mode: str
    epsilon: float
    delta: float
    accountant: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    unit: str
    status: str
    reserved_at: str
    committed_at: str | None
    resent: int = 0  # times its update was sent again unchanged (a server lost the round)


@dataclass(frozen=True)
class DatasetSummary:
    """Spent and remaining epsilon of one dataset."""

    dataset: str
    epsilon_max: float | None
    spent: float
    remaining: float | None
    runs: int
    rounds: int
    first: str | None
    last: str | None


@dataclass(frozen=True)
class RunSummary:
    """What one run spent on one dataset."""

    run_id: str
    dataset: str
    epsilon: float
    delta: float
    rounds: int
    reserved: int  # records never committed (counted as spent)
    unit: str  # what its epsilon protects; several, comma-separated, if rounds differed
    first: str
    last: str
    resent: int = 0  # rounds whose update was sent again unchanged, charged once


@dataclass(frozen=True)
class LedgerSummary:
    """``medfed site budget``: rows per dataset and per run."""

    datasets: list[DatasetSummary]
    runs: list[RunSummary]


def _protected_unit(mode: str, unit: str) -> str:
    """What a spend's epsilon protects: an update-level round protects the whole site."""
    return "site" if mode == "update" else unit


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _later(seconds: float) -> str:
    return (dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=seconds)).isoformat(
        timespec="seconds"
    )


def _new_id() -> str:
    return "ledger-" + uuid.uuid4().hex


class PrivacyLedger:
    """The persistent per-site, per-dataset privacy ledger.

    ``create``: make the file when it does not exist (an empty ledger with a new
    identity). Without it a missing file raises :class:`LedgerMissing`; whether a
    missing ledger may be created is for the caller to decide against the audit log
    (:func:`check_ledger`). ``config``: the site.toml named in the errors' fix.
    """

    def __init__(
        self, path: Path | str, *, create: bool = True, config: str | Path | None = None
    ) -> None:
        self.path = Path(path)
        self.config = config
        if not self.path.exists():
            if not create:
                raise LedgerMissing(
                    "The privacy ledger is missing.", where=str(self.path), config=config
                )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileExistsError):  # made meanwhile by another process
                _build(self.path)
        self.ledger_id = self._open()

    def _open(self) -> str:
        """Check the file is a ledger, add what older ledgers lack; its identity."""
        if self.path.stat().st_size == 0:  # never written so: a new ledger is made whole
            raise LedgerDamaged(
                "The privacy ledger file is empty (truncated).",
                where=str(self.path),
                config=self.config,
            )
        with self._connect() as con:  # reads first: no write lock on every open
            tables = {
                r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            }
            if "spends" not in tables:
                raise LedgerDamaged(
                    "The privacy ledger file holds no spends table: it is not a privacy ledger.",
                    where=str(self.path),
                    config=self.config,
                )
            if {"meta", "holds", "histories", "budgets"} <= tables:
                row = con.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
                columns = {r["name"] for r in con.execute("PRAGMA table_info(spends)")}
                if row is not None and "unit" in columns:
                    return str(row[0])
            con.executescript(_SCHEMA)
        self._migrate()
        with self._connect() as con:  # a ledger written before identities gets one now
            con.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)", (_new_id(),)
            )
            return str(con.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()[0])

    def _migrate(self) -> None:
        """Add the columns older ledgers lack.

        ``unit`` (conservatively: a sample-level record of that time protected one
        training example; update-level records protected the site's whole contribution)
        and ``resent`` (how often a round's update was sent again, unchanged, after the
        server lost it: no new epsilon).
        """

        def missing(con: sqlite3.Connection) -> set[str]:
            have = {r["name"] for r in con.execute("PRAGMA table_info(spends)")}
            return {"unit", "resent"} - have

        with self._connect() as con:  # a read first: no write lock on every open
            if not missing(con):
                return
        with self._transaction() as con:
            todo = missing(con)
            if "unit" in todo:
                con.execute("ALTER TABLE spends ADD COLUMN unit TEXT NOT NULL DEFAULT 'sample'")
                con.execute("UPDATE spends SET unit = 'site' WHERE mode = 'update'")
            if "resent" in todo:
                con.execute("ALTER TABLE spends ADD COLUMN resent INTEGER NOT NULL DEFAULT 0")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        # mode=rw: a ledger deleted under a running site is an error, never a new empty file
        uri = self.path.resolve().as_uri() + "?mode=rw"
        try:
            con = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.row_factory = sqlite3.Row
            yield con
        except sqlite3.Error as exc:
            raise self._error(exc) from exc
        finally:
            con.close()

    def _error(self, exc: sqlite3.Error) -> LedgerError:
        """A sqlite error as what it means for the site: damaged, missing, or else."""
        name = getattr(exc, "sqlite_errorname", "")
        if name in ("SQLITE_CORRUPT", "SQLITE_NOTADB") or type(exc) is sqlite3.DatabaseError:
            return LedgerDamaged(
                f"The privacy ledger cannot be read: {exc}.",
                where=str(self.path),
                config=self.config,
            )
        if name == "SQLITE_CANTOPEN" and not self.path.exists():
            return LedgerMissing(
                "The privacy ledger is missing (deleted while in use?).",
                where=str(self.path),
                config=self.config,
            )
        return LedgerError(
            f"Cannot use the privacy ledger: {exc}",
            where=str(self.path),
            fix="check the file's permissions and free disk space",
        )

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._connect() as con:
            con.execute("BEGIN IMMEDIATE")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")

    def integrity(self) -> None:
        """Raise :class:`LedgerDamaged` unless SQLite's quick check finds the file sound."""
        with self._connect() as con:
            rows = [str(r[0]) for r in con.execute("PRAGMA quick_check")]
        if rows != ["ok"]:
            raise LedgerDamaged(
                "The privacy ledger is damaged: " + "; ".join(rows[:3]) + ".",
                where=str(self.path),
                config=self.config,
            )

    # ------------------------------------------------------------------ reads

    @staticmethod
    def _spent(con: sqlite3.Connection, dataset: str) -> float:
        row = con.execute(
            "SELECT COALESCE(SUM(epsilon), 0.0) FROM spends WHERE dataset = ?", (dataset,)
        ).fetchone()
        return float(row[0])

    def spent(self, dataset: str) -> float:
        """Epsilon spent on ``dataset``: committed and reserved records alike."""
        with self._connect() as con:
            return self._spent(con, dataset)

    def remaining(self, dataset: str, budget: DatasetBudget) -> float:
        """``budget.epsilon_max`` minus what ``dataset`` has spent (may be negative)."""
        return budget.epsilon_max - self.spent(dataset)

    def run_history(self, run_id: str, dataset: str) -> list[HistoryEntry]:
        """The accountant history persisted for ``run_id`` on ``dataset``."""
        with self._connect() as con:
            return self._history(con, run_id, dataset)[0]

    @staticmethod
    def _history(
        con: sqlite3.Connection, run_id: str, dataset: str
    ) -> tuple[list[HistoryEntry], str | None, float | None]:
        row = con.execute(
            "SELECT history, accountant, delta FROM histories WHERE run_id = ? AND dataset = ?",
            (run_id, dataset),
        ).fetchone()
        if row is None:
            return [], None, None
        return (
            [(float(z), float(q), int(s)) for z, q, s in json.loads(row["history"])],
            row["accountant"],
            float(row["delta"]),
        )

    def _assess(
        self,
        con: sqlite3.Connection,
        run_id: str,
        dataset: str,
        *,
        budget: DatasetBudget,
        entries: list[HistoryEntry],
        delta: float,
        accountant: str,
        unit: str,
        run_epsilon_max: float | None,
        what: str,
    ) -> tuple[list[HistoryEntry], float, float, float]:
        """Check ``entries`` on top of the run's history, or raise the refusal.

        Returns (the run's history, its epsilon after ``entries``, the epsilon they
        add, what the dataset has spent so far).
        """
        if delta > budget.delta:
            raise LedgerError(
                f"Accounting at delta {delta:g} is above the budget's delta {budget.delta:g}.",
                where=f"privacy.datasets.{dataset}.delta",
                fix="the run's target_delta must not exceed the site's delta",
            )
        if unit not in ("sample", "scan", "patient", "site"):
            raise LedgerError(
                f"Unknown privacy unit {unit!r} for a spend on {dataset!r}.",
                expected="sample, scan, patient or site",
            )
        finer = {
            u: n
            for u, n in con.execute(
                "SELECT unit, COUNT(*) FROM spends WHERE dataset = ? GROUP BY unit", (dataset,)
            )
            if not unit_covers(u, budget.privacy_unit)
        }
        if not unit_covers(unit, budget.privacy_unit):
            finer[f"{unit} ({what})"] = 1
        if finer:
            raise UnitNotCovered(dataset=dataset, required=budget.privacy_unit, finer=finer)
        history, used_acc, used_delta = self._history(con, run_id, dataset)
        if history and (used_acc != accountant or used_delta != delta):
            raise LedgerError(
                f"Run {run_id!r} accounted dataset {dataset!r} with {used_acc} at delta "
                f"{used_delta:g}; {what} asks for {accountant} at delta {delta:g}.",
                fix="a run keeps one accountant and delta for all its rounds",
            )
        before = epsilon_of_history(history, delta, accountant)  # type: ignore[arg-type]
        after = epsilon_of_history([*history, *entries], delta, accountant)  # type: ignore[arg-type]
        asked = max(after - before, 0.0)
        if run_epsilon_max is not None and after > run_epsilon_max * (1 + TARGET_SLACK):
            raise RunTargetExceeded(
                run_id=run_id, dataset=dataset, after=after, target=run_epsilon_max
            )
        spent = self._spent(con, dataset)
        holds = self._held(con, dataset, exclude=run_id)
        if spent + sum(e for _, e in holds) + asked > budget.epsilon_max:
            raise BudgetExceeded(
                dataset=dataset,
                spent=spent,
                asked=asked,
                budget=budget.epsilon_max,
                what=what,
                holds=holds,
            )
        return history, after, asked, spent

    @staticmethod
    def _held(
        con: sqlite3.Connection, dataset: str, *, exclude: str = ""
    ) -> list[tuple[str, float]]:
        """(run, epsilon) each other live hold on ``dataset`` has not spent yet."""
        rows = con.execute(
            "SELECT h.run_id, h.epsilon - COALESCE((SELECT SUM(s.epsilon) FROM spends s "
            "WHERE s.run_id = h.run_id AND s.dataset = h.dataset), 0.0) AS outstanding "
            "FROM holds h WHERE h.dataset = ? AND h.run_id != ? AND h.expires > ? "
            "ORDER BY h.created, h.run_id",
            (dataset, exclude, _now()),
        ).fetchall()
        return [(str(r["run_id"]), float(r["outstanding"])) for r in rows if r["outstanding"] > 0]

    def held(self, dataset: str, *, exclude: str = "") -> float:
        """Epsilon that live holds on ``dataset`` (other than ``exclude``'s) keep back."""
        with self._connect() as con:
            return sum(e for _, e in self._held(con, dataset, exclude=exclude))

    def rounds_charged(self, run_id: str, dataset: str) -> int:
        """How many rounds of ``run_id`` are charged to ``dataset`` (reserved or committed)."""
        with self._connect() as con:
            row = con.execute(
                "SELECT COUNT(*) FROM spends WHERE run_id = ? AND dataset = ?", (run_id, dataset)
            ).fetchone()
        return int(row[0])

    def check_plan(
        self,
        run_id: str,
        dataset: str,
        *,
        budget: DatasetBudget,
        plan: Sequence[HistoryEntry],
        delta: float,
        accountant: str = "rdp",
        mode: str = "sample",
        unit: str = "sample",
        run_epsilon_max: float | None = None,
        rounds: int = 1,
    ) -> float:
        """Check whether the run's remaining ``rounds`` (``plan``: their history) fit.

        The checks of :meth:`reserve`, for all of them at once and writing nothing: a site
        refuses a run up front (when it joins) rather than after others spent on it.
        Returns the run's epsilon after them; raises what :meth:`reserve` raises.
        """
        entries = [(float(z), float(q), int(s)) for z, q, s in plan]
        with self._connect() as con:
            return self._assess(
                con,
                run_id,
                dataset,
                budget=budget,
                entries=entries,
                delta=delta,
                accountant=accountant,
                unit=_protected_unit(mode, unit),
                run_epsilon_max=run_epsilon_max,
                what="this run's next round" if rounds == 1 else f"this run's {rounds} rounds",
            )[1]

    # ------------------------------------------------------------------ writes

    def reserve(
        self,
        run_id: str,
        rnd: int,
        dataset: str,
        *,
        budget: DatasetBudget,
        round_history: Sequence[HistoryEntry],
        delta: float,
        accountant: str = "rdp",
        mode: str = "sample",
        unit: str = "sample",
        run_epsilon_max: float | None = None,
    ) -> Reservation:
        """Atomically charge one round to ``dataset``, or refuse it.

        The round's epsilon is the increment of the run's accountant epsilon
        (persisted history + ``round_history``) at ``delta``. Raises
        :class:`BudgetExceeded` (nothing written) when spent + reserved + asked
        exceeds ``budget.epsilon_max``; :class:`RunTargetExceeded` when the run's
        epsilon would pass ``run_epsilon_max`` (its target, :data:`TARGET_SLACK` relative
        slack); :class:`UnitNotCovered` when this round or an earlier spend on
        ``dataset`` protected less than ``budget.privacy_unit`` (``unit``: what this
        round protects; update-level rounds protect the ``site``). Otherwise the spend
        record and the run's extended history are on disk when this returns.
        """
        unit = _protected_unit(mode, unit)
        entries = [(float(z), float(q), int(s)) for z, q, s in round_history]
        with self._transaction() as con:
            history, after, asked, spent = self._assess(
                con,
                run_id,
                dataset,
                budget=budget,
                entries=entries,
                delta=delta,
                accountant=accountant,
                unit=unit,
                run_epsilon_max=run_epsilon_max,
                what="this round",
            )
            now = _now()
            con.execute(
                "INSERT INTO budgets (dataset, epsilon_max, delta, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT(dataset) DO UPDATE SET epsilon_max = excluded.epsilon_max, "
                "delta = excluded.delta, updated = excluded.updated",
                (dataset, budget.epsilon_max, budget.delta, now),
            )
            noise = entries[-1][0] if entries else 0.0
            rate = entries[-1][1] if entries else 0.0
            cur = con.execute(
                "INSERT INTO spends (run_id, round, dataset, mode, epsilon, delta, accountant, "
                "noise_multiplier, sample_rate, steps, unit, status, reserved_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'reserved', ?)",
                (
                    run_id,
                    int(rnd),
                    dataset,
                    mode,
                    asked,
                    delta,
                    accountant,
                    noise,
                    rate,
                    sum(e[2] for e in entries),
                    unit,
                    now,
                ),
            )
            con.execute(
                "INSERT INTO histories (run_id, dataset, accountant, delta, history, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, dataset) DO UPDATE SET "
                "history = excluded.history, updated = excluded.updated",
                (run_id, dataset, accountant, delta, json.dumps([*history, *entries]), now),
            )
            record_id = int(cur.lastrowid or 0)
            self._renew_hold(con, run_id, dataset)
        total = spent + asked
        return Reservation(record_id, asked, after, total, budget.epsilon_max - total)

    def commit(self, record_id: int, *, steps: int | None = None) -> None:
        """Mark a reserved spend as committed (the reply is about to leave).

        ``steps``, when given, must equal the reserved steps: training that ran
        more steps than were charged blocks the reply (fail closed).
        """
        with self._transaction() as con:
            row = con.execute(
                "SELECT steps, status FROM spends WHERE id = ?", (record_id,)
            ).fetchone()
            if row is None:
                raise LedgerError(
                    f"No spend record {record_id} in the privacy ledger.", where=str(self.path)
                )
            if steps is not None and int(steps) > int(row["steps"]):
                raise LedgerError(
                    f"Training ran {steps} DP steps but the ledger reserved {row['steps']}; "
                    "the reply is blocked.",
                    where=str(self.path),
                    fix="plan the round with privacy_accounting.plan_round (core) before training",
                )
            con.execute(
                "UPDATE spends SET status = 'committed', committed_at = ? WHERE id = ?",
                (_now(), record_id),
            )

    def hold(
        self,
        run_id: str,
        dataset: str,
        *,
        budget: DatasetBudget,
        plan: Sequence[HistoryEntry],
        delta: float,
        accountant: str = "rdp",
        mode: str = "sample",
        unit: str = "sample",
        run_epsilon_max: float | None = None,
        rounds: int = 1,
        round_timeout_s: float = 600.0,
    ) -> Hold:
        """Hold the epsilon of the run's next ``rounds`` rounds (``plan``) on ``dataset``.

        The checks of :meth:`check_plan` and the hold in one transaction: a run that
        does not fit beside what the dataset spent and what other live runs hold is
        refused (:class:`BudgetExceeded`, naming those holds) and holds nothing. The
        hold replaces an earlier one of the same run (a second join).
        """
        entries = [(float(z), float(q), int(s)) for z, q, s in plan]
        with self._transaction() as con:
            _, after, _, _ = self._assess(
                con,
                run_id,
                dataset,
                budget=budget,
                entries=entries,
                delta=delta,
                accountant=accountant,
                unit=_protected_unit(mode, unit),
                run_epsilon_max=run_epsilon_max,
                what="this run's next round" if rounds == 1 else f"this run's {rounds} rounds",
            )
            charged = int(
                con.execute(
                    "SELECT COUNT(*) FROM spends WHERE run_id = ? AND dataset = ?",
                    (run_id, dataset),
                ).fetchone()[0]
            )
            now = _now()
            expires = _later(hold_ttl(rounds, round_timeout_s))
            con.execute(
                "INSERT INTO holds (run_id, dataset, epsilon, rounds, round_timeout_s, created, "
                "expires) VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, dataset) DO UPDATE "
                "SET epsilon = excluded.epsilon, rounds = excluded.rounds, round_timeout_s = "
                "excluded.round_timeout_s, created = excluded.created, expires = excluded.expires",
                (
                    run_id,
                    dataset,
                    after,
                    charged + int(rounds),
                    float(round_timeout_s),
                    now,
                    expires,
                ),
            )
        return next(h for h in self.holds() if h.run_id == run_id and h.dataset == dataset)

    @staticmethod
    def _renew_hold(con: sqlite3.Connection, run_id: str, dataset: str) -> None:
        """A round of a run with a live hold: the hold lasts for its remaining rounds."""
        row = con.execute(
            "SELECT rounds, round_timeout_s FROM holds WHERE run_id = ? AND "
            "dataset = ? AND expires > ?",
            (run_id, dataset, _now()),
        ).fetchone()
        if row is None:
            return
        charged = int(
            con.execute(
                "SELECT COUNT(*) FROM spends WHERE run_id = ? AND dataset = ?", (run_id, dataset)
            ).fetchone()[0]
        )
        con.execute(
            "UPDATE holds SET expires = ? WHERE run_id = ? AND dataset = ?",
            (
                _later(hold_ttl(int(row["rounds"]) - charged, row["round_timeout_s"])),
                run_id,
                dataset,
            ),
        )

    def release(self, run_id: str) -> list[Hold]:
        """End the run's holds (it ended, or left); returns what they were."""
        held = [h for h in self.holds() if h.run_id == run_id]
        if held:
            with self._transaction() as con:
                con.execute("DELETE FROM holds WHERE run_id = ?", (run_id,))
        return held

    # ------------------------------------------------------------------ reports

    def holds(self) -> list[Hold]:
        """Every hold, live and expired, oldest first."""
        now = _now()
        with self._connect() as con:
            rows = con.execute(
                "SELECT h.*, h.epsilon - COALESCE((SELECT SUM(s.epsilon) FROM spends s "
                "WHERE s.run_id = h.run_id AND s.dataset = h.dataset), 0.0) AS outstanding "
                "FROM holds h ORDER BY h.created, h.run_id"
            ).fetchall()
        return [
            Hold(
                run_id=str(r["run_id"]),
                dataset=r["dataset"],
                epsilon=float(r["epsilon"]),
                outstanding=max(float(r["outstanding"]), 0.0),
                rounds=int(r["rounds"]),
                created=r["created"],
                expires=r["expires"],
                expired=r["expires"] <= now,
            )
            for r in rows
        ]

    def committed_round(self, run_id: str, rnd: int) -> SpendRecord | None:
        """The committed spend of ``run_id``'s round ``rnd`` (its last), if any."""
        with self._connect() as con:
            row = con.execute(
                "SELECT * FROM spends WHERE run_id = ? AND round = ? AND "
                "status = 'committed' ORDER BY id DESC LIMIT 1",
                (run_id, int(rnd)),
            ).fetchone()
        return None if row is None else SpendRecord(**dict(row))

    def mark_resent(self, record_id: int) -> None:
        """Count one more sending of the update ``record_id`` paid for: no new epsilon."""
        with self._transaction() as con:
            cur = con.execute(
                "UPDATE spends SET resent = resent + 1 WHERE id = ? AND status = 'committed'",
                (record_id,),
            )
            if cur.rowcount != 1:
                raise LedgerError(
                    f"No committed spend record {record_id} to send again.", where=str(self.path)
                )

    def record(self, record_id: int) -> SpendRecord:
        """One spend record by id."""
        with self._connect() as con:
            row = con.execute("SELECT * FROM spends WHERE id = ?", (record_id,)).fetchone()
        if row is None:
            raise LedgerError(
                f"No spend record {record_id} in the privacy ledger.", where=str(self.path)
            )
        return SpendRecord(**dict(row))

    def spend_totals(self) -> dict[tuple[str, int, str], float]:
        """Epsilon per (run, round, dataset): what the audit log is compared with."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT run_id, round, dataset, SUM(epsilon) FROM spends "
                "GROUP BY run_id, round, dataset"
            ).fetchall()
        return {(str(r[0]), int(r[1]), str(r[2])): float(r[3]) for r in rows}

    def history(self, dataset: str) -> list[SpendRecord]:
        """Every spend record of ``dataset``, oldest first."""
        with self._connect() as con:
            rows = con.execute(
                "SELECT * FROM spends WHERE dataset = ? ORDER BY id", (dataset,)
            ).fetchall()
        return [SpendRecord(**dict(r)) for r in rows]

    def summary(self) -> LedgerSummary:
        """Spent and remaining epsilon per dataset, and each run's spend, with dates."""
        with self._connect() as con:
            ds = con.execute(
                "SELECT s.dataset, b.epsilon_max, SUM(s.epsilon) AS spent, "
                "COUNT(DISTINCT s.run_id) AS runs, COUNT(*) AS rounds, "
                "MIN(s.reserved_at) AS first, MAX(s.reserved_at) AS last "
                "FROM spends s LEFT JOIN budgets b ON b.dataset = s.dataset "
                "GROUP BY s.dataset ORDER BY s.dataset"
            ).fetchall()
            runs = con.execute(
                "SELECT run_id, dataset, SUM(epsilon) AS epsilon, MAX(delta) AS delta, "
                "COUNT(*) AS rounds, SUM(status = 'reserved') AS reserved, "
                "GROUP_CONCAT(DISTINCT unit) AS unit, SUM(resent > 0) AS resent, "
                "MIN(reserved_at) AS first, MAX(reserved_at) AS last "
                "FROM spends GROUP BY run_id, dataset ORDER BY first, run_id"
            ).fetchall()
        return LedgerSummary(
            datasets=[
                DatasetSummary(
                    dataset=r["dataset"],
                    epsilon_max=r["epsilon_max"],
                    spent=float(r["spent"]),
                    remaining=None if r["epsilon_max"] is None else r["epsilon_max"] - r["spent"],
                    runs=r["runs"],
                    rounds=r["rounds"],
                    first=r["first"],
                    last=r["last"],
                )
                for r in ds
            ],
            runs=[
                RunSummary(
                    run_id=r["run_id"],
                    dataset=r["dataset"],
                    epsilon=float(r["epsilon"]),
                    delta=float(r["delta"]),
                    rounds=r["rounds"],
                    reserved=int(r["reserved"]),
                    unit=r["unit"],
                    first=r["first"],
                    last=r["last"],
                    resent=int(r["resent"] or 0),
                )
                for r in runs
            ],
        )


def _build(path: Path, fill: Callable[[sqlite3.Connection], None] | None = None) -> str:
    """Make a whole ledger at ``path`` and return its identity.

    Written under a temporary name and linked into place, so ``path`` is either absent
    or a whole ledger (never an empty file a crash left); never over an existing file
    (``FileExistsError``). ``fill`` writes rows in the same transaction.
    """
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    ledger_id = _new_id()
    try:
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA synchronous=FULL")
            con.executescript(_SCHEMA)
            con.execute("BEGIN IMMEDIATE")
            con.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?)",
                [("ledger_id", ledger_id), ("created", _now())],
            )
            if fill is not None:
                fill(con)
            con.execute("COMMIT")
        finally:
            con.close()
        os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)  # the new name is on disk
    finally:
        os.close(fd)
    return ledger_id
