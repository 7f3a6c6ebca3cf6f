"""The site's privacy ledger: refuses over-budget rounds and never under-counts after a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from opacus.accountants import PRVAccountant

from medfed.client.ledger import BudgetExceeded, LedgerError, PrivacyLedger, UnitNotCovered
from medfed.core import privacy_accounting
from medfed.core.privacy import DatasetBudget

BUDGET = DatasetBudget(
    epsilon_max=10.0, delta=1e-5, min_noise_multiplier=0.5, max_clipping_norm=1.0
)
ROUND = [(1.0, 0.1, 10)]  # one round: 10 steps at q = 0.1, sigma = 1


def _reserve(ledger: PrivacyLedger, run: str, rnd: int, dataset: str = "brain"):
    return ledger.reserve(run, rnd, dataset, budget=BUDGET, round_history=ROUND, delta=1e-5)


def test_rounds_of_a_run_compose_through_the_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    first = _reserve(ledger, "run-a", 1)
    ledger.commit(first.record_id, steps=10)
    second = _reserve(ledger, "run-a", 2)
    assert first.epsilon == pytest.approx(privacy_accounting.epsilon_for(10, 0.1, 1.0, 1e-5))
    assert second.run_epsilon == pytest.approx(privacy_accounting.epsilon_for(20, 0.1, 1.0, 1e-5))
    assert ledger.spent("brain") == pytest.approx(second.run_epsilon)
    assert ledger.remaining("brain", BUDGET) == pytest.approx(10.0 - second.run_epsilon)
    assert ledger.run_history("run-a", "brain") == [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    assert [r.status for r in ledger.history("brain")] == ["committed", "reserved"]


def test_a_prv_run_is_charged_what_opacus_prv_accountant_reports(tmp_path: Path) -> None:
    # Opacus's PRV accountant stepped as DP-SGD steps it: 3 rounds of 10 steps
    stepped = PRVAccountant()
    for _ in range(30):
        stepped.step(noise_multiplier=1.0, sample_rate=0.1)
    independent = float(stepped.get_epsilon(delta=1e-5))
    assert independent == pytest.approx(4.18855485888563, rel=1e-9)  # Opacus 1.6
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    for rnd in (1, 2, 3):
        r = ledger.reserve(
            "run-a", rnd, "brain", budget=BUDGET, round_history=ROUND, delta=1e-5, accountant="prv"
        )
        ledger.commit(r.record_id, steps=10)
    assert r.run_epsilon == pytest.approx(independent, rel=1e-9)
    assert ledger.spent("brain") == pytest.approx(independent, rel=1e-9)


def test_runs_on_one_dataset_add_up_and_datasets_are_separate(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    a, b = _reserve(ledger, "run-a", 1), _reserve(ledger, "run-b", 1)
    _reserve(ledger, "run-a", 1, dataset="lung")
    assert ledger.spent("brain") == pytest.approx(a.epsilon + b.epsilon)  # basic composition
    summary = ledger.summary()
    assert [(d.dataset, d.runs, d.rounds) for d in summary.datasets] == [
        ("brain", 2, 2),
        ("lung", 1, 1),
    ]
    assert summary.datasets[0].remaining == pytest.approx(10.0 - a.epsilon - b.epsilon)
    assert {(r.run_id, r.dataset) for r in summary.runs} == {
        ("run-a", "brain"),
        ("run-b", "brain"),
        ("run-a", "lung"),
    }
    assert all(r.reserved == 1 and r.first for r in summary.runs)


def test_the_ledger_refuses_an_over_budget_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    small = BUDGET.model_copy(update={"epsilon_max": 5.0})
    spent = 0.0
    with pytest.raises(BudgetExceeded) as caught:
        for rnd in range(1, 10):
            spent = ledger.reserve(
                "run-a", rnd, "brain", budget=small, round_history=ROUND, delta=1e-5
            ).spent
    err = caught.value
    assert err.dataset == "brain" and err.budget == 5.0 and rnd == 4  # eps 3.4, 4.2, 4.8, 5.4
    assert err.spent == pytest.approx(spent) and spent + err.asked > 5.0
    assert "brain" in str(err) and "epsilon_max" in str(err)
    assert ledger.spent("brain") == pytest.approx(spent)  # the refused round wrote nothing
    assert ledger.spent("brain") <= 5.0


def test_a_run_keeps_one_accountant_and_delta(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    _reserve(ledger, "run-a", 1)
    with pytest.raises(LedgerError, match="one accountant"):
        ledger.reserve("run-a", 2, "brain", budget=BUDGET, round_history=ROUND, delta=1e-6)
    with pytest.raises(LedgerError, match="above the budget"):
        ledger.reserve("run-b", 1, "brain", budget=BUDGET, round_history=ROUND, delta=1e-4)


def test_commit_blocks_a_round_that_trained_more_steps_than_reserved(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    with pytest.raises(LedgerError, match="blocked"):
        ledger.commit(_reserve(ledger, "run-a", 1).record_id, steps=11)


def test_spends_name_their_unit_and_a_coarser_policy_refuses_finer_ones(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    _reserve(ledger, "run-slices", 1)  # per sample
    ledger.reserve(
        "run-update",
        1,
        "brain",
        budget=BUDGET,
        round_history=[(1.0, 1.0, 1)],
        delta=1e-5,
        mode="update",
        unit="sample",
    )  # update-level protects the site
    assert {r.run_id: r.unit for r in ledger.history("brain")} == {
        "run-slices": "sample",
        "run-update": "site",
    }
    per_scan = BUDGET.model_copy(update={"privacy_unit": "scan"})
    spent = ledger.spent("brain")
    with pytest.raises(UnitNotCovered) as caught:  # the operator raised privacy_unit later
        ledger.reserve(
            "run-scans", 1, "brain", budget=per_scan, round_history=ROUND, delta=1e-5, unit="scan"
        )
    assert caught.value.finer == {"sample": 1}
    assert "privacy_unit" in caught.value.where and "1 round(s) per sample" in str(caught.value)
    assert ledger.spent("brain") == pytest.approx(spent)  # the refusal wrote nothing
    # another dataset, spent per scan only, takes per-scan and update-level rounds
    ledger.reserve(
        "run-scans", 1, "lung", budget=per_scan, round_history=ROUND, delta=1e-5, unit="scan"
    )
    ledger.reserve(
        "run-update",
        1,
        "lung",
        budget=per_scan,
        round_history=[(1.0, 1.0, 1)],
        delta=1e-5,
        mode="update",
    )
    with pytest.raises(UnitNotCovered, match="this round"):  # a finer round itself
        ledger.reserve("run-x", 1, "lung", budget=per_scan, round_history=ROUND, delta=1e-5)
    with pytest.raises(LedgerError, match="Unknown privacy unit"):
        ledger.reserve(
            "run-x", 1, "lung", budget=BUDGET, round_history=ROUND, delta=1e-5, unit="slice"
        )
    units = {(r.run_id, r.dataset): r.unit for r in ledger.summary().runs}
    assert units[("run-scans", "lung")] == "scan" and units[("run-update", "lung")] == "site"


def test_a_ledger_written_before_units_reads_its_spends_as_per_sample(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "ledger.sqlite"
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE spends (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL,
            round INTEGER NOT NULL, dataset TEXT NOT NULL, mode TEXT NOT NULL,
            epsilon REAL NOT NULL, delta REAL NOT NULL, accountant TEXT NOT NULL,
            noise_multiplier REAL NOT NULL, sample_rate REAL NOT NULL, steps INTEGER NOT NULL,
            status TEXT NOT NULL, reserved_at TEXT NOT NULL, committed_at TEXT);
        INSERT INTO spends VALUES (1, 'old', 1, 'brain', 'sample', 2.5, 1e-5, 'rdp', 1.0, 0.1,
            10, 'committed', '2026-01-01T00:00:00+00:00', '2026-01-01T00:00:01+00:00');
        INSERT INTO spends VALUES (2, 'old-u', 1, 'brain', 'update', 0.5, 1e-5, 'rdp', 1.0, 1.0,
            1, 'committed', '2026-01-02T00:00:00+00:00', '2026-01-02T00:00:01+00:00');
    """)
    con.commit()
    con.close()
    ledger = PrivacyLedger(path)
    assert [(r.run_id, r.unit) for r in ledger.history("brain")] == [
        ("old", "sample"),
        ("old-u", "site"),
    ]
    assert ledger.spent("brain") == pytest.approx(3.0)  # nothing lost
    with pytest.raises(UnitNotCovered):
        ledger.reserve(
            "new",
            1,
            "brain",
            round_history=ROUND,
            delta=1e-5,
            unit="patient",
            budget=BUDGET.model_copy(update={"privacy_unit": "patient"}),
        )
    PrivacyLedger(path)  # opening it again migrates nothing twice


CRASHING_SITE = textwrap.dedent("""
    import os, signal, sys
    from medfed.client.ledger import PrivacyLedger
    from medfed.core.privacy import DatasetBudget
    ledger = PrivacyLedger(sys.argv[1])
    budget = DatasetBudget(epsilon_max=10.0, delta=1e-5)
    r = ledger.reserve("run-a", 1, "brain", budget=budget,
                       round_history=[(1.0, 0.1, 10)], delta=1e-5)
    print(r.epsilon, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # "trained", died before sending or committing
""")


def test_a_reserved_spend_survives_a_kill_before_sending(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    proc = subprocess.run(
        [sys.executable, "-c", CRASHING_SITE, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    asked = float(proc.stdout.split()[0])
    ledger = PrivacyLedger(path)  # the restarted daemon
    assert ledger.spent("brain") == pytest.approx(asked) and asked > 0
    assert [r.status for r in ledger.history("brain")] == ["reserved"]
    # the restarted run continues the accountant's history, not from zero
    nxt = _reserve(ledger, "run-a", 2)
    assert nxt.run_epsilon == pytest.approx(privacy_accounting.epsilon_for(20, 0.1, 1.0, 1e-5))
