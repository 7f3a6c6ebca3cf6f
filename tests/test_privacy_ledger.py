"""The site's privacy ledger: refuses over-budget rounds and never under-counts after a crash."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medfed.client.ledger import BudgetExceeded, LedgerError, PrivacyLedger
from medfed.core.privacy import DatasetBudget
from medfed.tasks import dp

BUDGET = DatasetBudget(epsilon_max=10.0, delta=1e-5, min_noise_multiplier=0.5,
                       max_clipping_norm=1.0)
ROUND = [(1.0, 0.1, 10)]  # one round: 10 steps at q = 0.1, sigma = 1


def _reserve(ledger: PrivacyLedger, run: str, rnd: int, dataset: str = "brain"):
    return ledger.reserve(run, rnd, dataset, budget=BUDGET, round_history=ROUND, delta=1e-5)


def test_rounds_of_a_run_compose_through_the_accountant(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    first = _reserve(ledger, "run-a", 1)
    ledger.commit(first.record_id, steps=10)
    second = _reserve(ledger, "run-a", 2)
    assert first.epsilon == pytest.approx(dp.epsilon_for(10, 0.1, 1.0, 1e-5))
    assert second.run_epsilon == pytest.approx(dp.epsilon_for(20, 0.1, 1.0, 1e-5))
    assert ledger.spent("brain") == pytest.approx(second.run_epsilon)
    assert ledger.remaining("brain", BUDGET) == pytest.approx(10.0 - second.run_epsilon)
    assert ledger.run_history("run-a", "brain") == [(1.0, 0.1, 10), (1.0, 0.1, 10)]
    assert [r.status for r in ledger.history("brain")] == ["committed", "reserved"]


def test_runs_on_one_dataset_add_up_and_datasets_are_separate(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    a, b = _reserve(ledger, "run-a", 1), _reserve(ledger, "run-b", 1)
    _reserve(ledger, "run-a", 1, dataset="lung")
    assert ledger.spent("brain") == pytest.approx(a.epsilon + b.epsilon)  # basic composition
    summary = ledger.summary()
    assert [(d.dataset, d.runs, d.rounds) for d in summary.datasets] == [
        ("brain", 2, 2), ("lung", 1, 1)]
    assert summary.datasets[0].remaining == pytest.approx(10.0 - a.epsilon - b.epsilon)
    assert {(r.run_id, r.dataset) for r in summary.runs} == {
        ("run-a", "brain"), ("run-b", "brain"), ("run-a", "lung")}
    assert all(r.reserved == 1 and r.first for r in summary.runs)


def test_the_ledger_refuses_an_over_budget_round(tmp_path: Path) -> None:
    ledger = PrivacyLedger(tmp_path / "ledger.sqlite")
    small = BUDGET.model_copy(update={"epsilon_max": 5.0})
    spent = 0.0
    with pytest.raises(BudgetExceeded) as caught:
        for rnd in range(1, 10):
            spent = ledger.reserve("run-a", rnd, "brain", budget=small, round_history=ROUND,
                                   delta=1e-5).spent
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
    proc = subprocess.run([sys.executable, "-c", CRASHING_SITE, str(path)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    asked = float(proc.stdout.split()[0])
    ledger = PrivacyLedger(path)  # the restarted daemon
    assert ledger.spent("brain") == pytest.approx(asked) and asked > 0
    assert [r.status for r in ledger.history("brain")] == ["reserved"]
    # the restarted run continues the accountant's history, not from zero
    nxt = _reserve(ledger, "run-a", 2)
    assert nxt.run_epsilon == pytest.approx(dp.epsilon_for(20, 0.1, 1.0, 1e-5))
