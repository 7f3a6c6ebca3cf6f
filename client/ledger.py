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
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from medfed.core.errors import MedfedError
from medfed.core.privacy import DatasetBudget, unit_covers
from medfed.tasks.dp import HistoryEntry, epsilon_of_history

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
    committed_at     TEXT
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
"""


class LedgerError(MedfedError):
    """The privacy ledger cannot record or confirm a spend; the reply is blocked."""


class BudgetExceeded(LedgerError):
    """A round would take a dataset past its epsilon budget."""

    def __init__(self, *, dataset: str, spent: float, asked: float, budget: float,
                 what: str = "this round") -> None:
        self.dataset, self.spent, self.asked, self.budget = dataset, spent, asked, budget
        left = max(budget - spent, 0.0)
        super().__init__(
            f"Privacy budget exceeded for dataset {dataset!r}: spent {spent:.4g} + {what} "
            f"{asked:.4g} > epsilon_max {budget:.4g} (remaining {left:.4g}).",
            where=f"privacy.datasets.{dataset}.epsilon_max",
            expected=f"{what} spending at most {left:.4g}",
            fix=f"the site refuses {what}; the coordinator may ask for fewer rounds, more "
            f"noise or a --target-epsilon of at most {left:.4g}, and only the site operator "
            "may raise epsilon_max",
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


class PrivacyLedger:
    """The persistent per-site, per-dataset privacy ledger."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists():
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
        with self._connect() as con:
            con.executescript(_SCHEMA)
        self._migrate()

    def _migrate(self) -> None:
        """Ledgers written before records named their unit: add it, conservatively.

        A sample-level record of that time protected one training example; update-level
        records protected the site's whole contribution.
        """
        with self._connect() as con:  # a read first: no write lock on every open
            if "unit" in {r["name"] for r in con.execute("PRAGMA table_info(spends)")}:
                return
        with self._transaction() as con:
            if "unit" not in {r["name"] for r in con.execute("PRAGMA table_info(spends)")}:
                con.execute("ALTER TABLE spends ADD COLUMN unit TEXT NOT NULL DEFAULT 'sample'")
                con.execute("UPDATE spends SET unit = 'site' WHERE mode = 'update'")

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        try:
            con = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        except sqlite3.Error as exc:
            raise LedgerError(
                f"Cannot open the privacy ledger: {exc}", where=str(self.path),
                fix="check the file's permissions and free disk space",
            ) from exc
        try:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.row_factory = sqlite3.Row
            yield con
        finally:
            con.close()

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
        return ([(float(z), float(q), int(s)) for z, q, s in json.loads(row["history"])],
                row["accountant"], float(row["delta"]))

    def _assess(
        self, con: sqlite3.Connection, run_id: str, dataset: str, *, budget: DatasetBudget,
        entries: list[HistoryEntry], delta: float, accountant: str, unit: str,
        run_epsilon_max: float | None, what: str,
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
            raise LedgerError(f"Unknown privacy unit {unit!r} for a spend on {dataset!r}.",
                              expected="sample, scan, patient or site")
        finer = {u: n for u, n in con.execute(
            "SELECT unit, COUNT(*) FROM spends WHERE dataset = ? GROUP BY unit", (dataset,))
            if not unit_covers(u, budget.privacy_unit)}
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
            raise RunTargetExceeded(run_id=run_id, dataset=dataset, after=after,
                                    target=run_epsilon_max)
        spent = self._spent(con, dataset)
        if spent + asked > budget.epsilon_max:
            raise BudgetExceeded(dataset=dataset, spent=spent, asked=asked,
                                 budget=budget.epsilon_max, what=what)
        return history, after, asked, spent

    def rounds_charged(self, run_id: str, dataset: str) -> int:
        """How many rounds of ``run_id`` are charged to ``dataset`` (reserved or committed)."""
        with self._connect() as con:
            row = con.execute("SELECT COUNT(*) FROM spends WHERE run_id = ? AND dataset = ?",
                              (run_id, dataset)).fetchone()
        return int(row[0])

    def check_plan(
        self, run_id: str, dataset: str, *, budget: DatasetBudget,
        plan: Sequence[HistoryEntry], delta: float, accountant: str = "rdp",
        mode: str = "sample", unit: str = "sample", run_epsilon_max: float | None = None,
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
                con, run_id, dataset, budget=budget, entries=entries, delta=delta,
                accountant=accountant, unit=_protected_unit(mode, unit),
                run_epsilon_max=run_epsilon_max,
                what="this run's next round" if rounds == 1 else f"this run's {rounds} rounds")[1]

    # ------------------------------------------------------------------ writes

    def reserve(
        self, run_id: str, rnd: int, dataset: str, *, budget: DatasetBudget,
        round_history: Sequence[HistoryEntry], delta: float, accountant: str = "rdp",
        mode: str = "sample", unit: str = "sample", run_epsilon_max: float | None = None,
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
                con, run_id, dataset, budget=budget, entries=entries, delta=delta,
                accountant=accountant, unit=unit,
                run_epsilon_max=run_epsilon_max, what="this round")
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
                (run_id, int(rnd), dataset, mode, asked, delta, accountant, noise, rate,
                 sum(e[2] for e in entries), unit, now),
            )
            con.execute(
                "INSERT INTO histories (run_id, dataset, accountant, delta, history, updated) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(run_id, dataset) DO UPDATE SET "
                "history = excluded.history, updated = excluded.updated",
                (run_id, dataset, accountant, delta, json.dumps([*history, *entries]), now),
            )
            record_id = int(cur.lastrowid or 0)
        total = spent + asked
        return Reservation(record_id, asked, after, total, budget.epsilon_max - total)

    def commit(self, record_id: int, *, steps: int | None = None) -> None:
        """Mark a reserved spend as committed (the reply is about to leave).

        ``steps``, when given, must equal the reserved steps: training that ran
        more steps than were charged blocks the reply (fail closed).
        """
        with self._transaction() as con:
            row = con.execute("SELECT steps, status FROM spends WHERE id = ?",
                              (record_id,)).fetchone()
            if row is None:
                raise LedgerError(f"No spend record {record_id} in the privacy ledger.",
                                  where=str(self.path))
            if steps is not None and int(steps) > int(row["steps"]):
                raise LedgerError(
                    f"Training ran {steps} DP steps but the ledger reserved {row['steps']}; "
                    "the reply is blocked.", where=str(self.path),
                    fix="plan the round with medfed.tasks.dp.plan_round before training",
                )
            con.execute("UPDATE spends SET status = 'committed', committed_at = ? WHERE id = ?",
                        (_now(), record_id))

    # ------------------------------------------------------------------ reports

    def history(self, dataset: str) -> list[SpendRecord]:
        """Every spend record of ``dataset``, oldest first."""
        with self._connect() as con:
            rows = con.execute("SELECT * FROM spends WHERE dataset = ? ORDER BY id",
                               (dataset,)).fetchall()
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
                "GROUP_CONCAT(DISTINCT unit) AS unit, "
                "MIN(reserved_at) AS first, MAX(reserved_at) AS last "
                "FROM spends GROUP BY run_id, dataset ORDER BY first, run_id"
            ).fetchall()
        return LedgerSummary(
            datasets=[DatasetSummary(
                dataset=r["dataset"], epsilon_max=r["epsilon_max"], spent=float(r["spent"]),
                remaining=None if r["epsilon_max"] is None else r["epsilon_max"] - r["spent"],
                runs=r["runs"], rounds=r["rounds"], first=r["first"], last=r["last"],
            ) for r in ds],
            runs=[RunSummary(
                run_id=r["run_id"], dataset=r["dataset"], epsilon=float(r["epsilon"]),
                delta=float(r["delta"]), rounds=r["rounds"], reserved=int(r["reserved"]),
                unit=r["unit"], first=r["first"], last=r["last"],
            ) for r in runs],
        )
