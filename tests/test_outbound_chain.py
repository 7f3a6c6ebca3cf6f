"""The site's outbound path as an ordered chain of filters, and one trainer interface.

The order is data and is checked when a chain is built: a chain that masks before
update-level DP, commits the budget before the reply exists, or writes anything after
the audit record is refused. A trained round's audit record lists the filters it went
through, in order; a resend lists its own chain.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from medfed.client import outbound
from medfed.client.ledger import PrivacyLedger
from medfed.client.outbound import OutboundChain, OutboundOrderError
from medfed.core import wire
from medfed.core.config import DataSourceConfig, RunConfig
from medfed.core.packing import WEIGHTS_KEY
from medfed.tasks import engine, get_task
from medfed.tasks.trainer import DpSgdTrainer, PlainTrainer, RoundOptions
from tests.test_worker_privacy import dp_run, make_worker, train_request
from tests.test_worker_resend import _resumed

TRAIN_ORDER = ["local-split", "update-dp", "keep-for-resend", "mask", "ledger-commit", "audit"]
RESEND_ORDER = ["replay", "mask", "ledger-resent", "audit"]


def test_the_workers_chains_run_in_the_documented_order(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    assert worker._train_chain.names == TRAIN_ORDER
    assert worker._resend_chain.names == RESEND_ORDER


def _reordered(chain: OutboundChain, order: list[str]) -> list[outbound.Filter]:
    by_name = {f.name: f for f in chain.filters}
    return [by_name[n] for n in order]


@pytest.mark.parametrize(
    ("order", "complaint"),
    [
        # masking first: update-level DP would noise a masked vector
        (
            ["local-split", "mask", "update-dp", "keep-for-resend", "ledger-commit", "audit"],
            "'mask' needs ['final-vector', 'kept']",
        ),
        # epsilon committed before the reply exists (a failed masking would still charge)
        (
            ["local-split", "update-dp", "keep-for-resend", "ledger-commit", "mask", "audit"],
            "'ledger-commit' needs ['reply-arrays']",
        ),
        # nothing kept for a resend before the reply leaves
        (
            ["local-split", "update-dp", "mask", "keep-for-resend", "ledger-commit", "audit"],
            "'mask' needs ['kept']",
        ),
        # the audit record is not the last thing written
        (
            ["local-split", "update-dp", "keep-for-resend", "mask", "audit", "ledger-commit"],
            "'audit' needs ['budget-settled']",
        ),
        # a filter left out
        (
            ["local-split", "keep-for-resend", "mask", "ledger-commit", "audit"],
            "'keep-for-resend' needs ['final-vector']",
        ),
    ],
)
def test_a_chain_in_the_wrong_order_is_refused(
    tmp_path: Path, order: list[str], complaint: str
) -> None:
    chain = make_worker(tmp_path)._train_chain
    with pytest.raises(OutboundOrderError, match="filter " + re.escape(complaint)):
        OutboundChain(_reordered(chain, order), given=frozenset({"trained"}))


def test_a_chain_must_end_with_the_audit_record(tmp_path: Path) -> None:
    chain = make_worker(tmp_path)._resend_chain
    with pytest.raises(OutboundOrderError, match="must end with the audit record"):
        OutboundChain(_reordered(chain, ["replay", "mask", "ledger-resent"]))


def test_a_dp_round_records_every_filter_in_order_in_its_audit_record(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, min_noise_multiplier=0.0)
    run = RunConfig(
        secure_aggregation="off",
        task="tiny-seg",
        privacy={"mode": "update", "noise_multiplier": 1.0, "clipping_norm": 0.5},
    )
    reply = worker.handle(train_request(run))
    assert reply.header["ok"], reply.header
    (sent,) = [r for r in worker.audit.read() if r["event"] == "update-sent"]
    trail = sent["outbound"]
    assert [step["filter"] for step in trail] == TRAIN_ORDER
    assert trail[1] == {"filter": "update-dp", "noised": True}
    assert trail[3]["protection"] == "tls" and trail[4]["committed"] is True
    assert worker.audit.verify().intact


def test_a_resend_records_its_own_chain(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    first = worker.handle(train_request(dp_run(), rnd=2))
    again = worker.handle(_resumed(train_request(dp_run(), rnd=2)))
    assert first.header["ok"] and again.header["ok"], (first.header, again.header)
    sent = [r for r in worker.audit.read() if r["event"] == "update-sent"]
    assert [s["filter"] for s in sent[0]["outbound"]] == TRAIN_ORDER
    assert [s["filter"] for s in sent[1]["outbound"]] == RESEND_ORDER
    assert sent[1]["outbound"][2]["ledger_record"] == sent[0]["privacy"]["ledger_record"]


def _trained_distance(trainer: object, mu: float) -> float:
    """How far one round of ``trainer`` moves tiny-seg's model with proximal term ``mu``."""
    task = get_task("tiny-seg")
    torch.manual_seed(0)
    model = task.build_model()
    start = np.concatenate([v.ravel() for v in engine.get_weights(model).values()])
    data = task.load_site_data(DataSourceConfig(num_samples=16, seed=3)).train
    trainer.train(task, model, data, RoundOptions(2, 4, 0.05, proximal_mu=mu))  # type: ignore[attr-defined]
    end = np.concatenate([v.ravel() for v in engine.get_weights(model).values()])
    return float(np.linalg.norm(end - start))


@pytest.mark.parametrize("kind", ["plain", "dp-sgd"])
def test_both_trainers_honour_the_proximal_term(kind: str) -> None:
    cpu = torch.device("cpu")

    def trainer() -> object:
        if kind == "plain":
            return PlainTrainer(cpu, seed=5, amp=False)
        # no noise: the proximal term alone must pull the model back to the global one
        return DpSgdTrainer(cpu, noise_multiplier=0.0, max_grad_norm=10.0)

    free, held = _trained_distance(trainer(), 0.0), _trained_distance(trainer(), 1e4)
    assert held < 0.5 * free, (free, held)


def test_a_negative_proximal_term_is_refused_with_its_option() -> None:
    with pytest.raises(ValueError, match="proximal_mu"):
        RoundOptions(1, 4, 0.1, proximal_mu=-1.0)


def test_the_round_options_reach_the_worker_from_the_strategy(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    request = train_request(dp_run(), rnd=1)
    request.header["config"][wire.PROXIMAL_MU_KEY] = -0.5
    reply = worker.handle(request)
    assert not reply.header["ok"] and reply.header["rule"] == "strategy.proximal_mu"
    assert "expected a value >= 0" in reply.header["reason"]
    assert WEIGHTS_KEY not in reply.arrays
    # refused before the privacy gate: nothing reserved, nothing spent
    assert not PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").history("brain")
