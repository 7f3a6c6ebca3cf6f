"""The site worker under its privacy policy: DP rounds charged to the ledger, refusals named."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from medfed.client.ledger import PrivacyLedger
from medfed.client.worker import SiteWorker
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.packing import WEIGHTS_KEY, pack
from medfed.tasks import engine, get_task

BUDGET = {
    "epsilon_max": 20.0,
    "delta": 1e-5,
    "min_noise_multiplier": 0.8,
    "max_clipping_norm": 2.0,
    "dp_required": True,
}


def make_worker(tmp: Path, num_samples: int = 32, **budget: object) -> SiteWorker:
    cfg = validate(
        SiteConfig,
        {
            "site": {"name": "site-x"},
            "data": {"num_samples": num_samples},
            "privacy": {"default": "brain", "datasets": {"brain": {**BUDGET, **budget}}},
            "compute": {"threads": 1},
        },
        where="test",
    )
    return SiteWorker(cfg, tmp / "site.toml")


def train_request(run: RunConfig, rnd: int = 1) -> wire.Frame:
    torch.manual_seed(0)
    weights = {WEIGHTS_KEY: pack(engine.get_weights(get_task(run.task).build_model()))}
    return wire.Frame(
        {
            "op": "train",
            "run_id": 42,
            "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: rnd},
        },
        weights,
    )


def dp_run(**privacy: object) -> RunConfig:
    return RunConfig(
        secure_aggregation="off",
        task="tiny-seg",
        privacy={"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, **privacy},
    )


def test_dp_round_is_charged_and_reported(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)
    reply = worker.handle(train_request(dp_run()))
    assert reply.header["ok"], reply.header
    m = reply.header["metrics"]
    # independent Opacus computation: 24 training examples, batch 16 -> q = 1/2, 2 steps
    rdp = compute_rdp(q=0.5, noise_multiplier=1.0, steps=2, orders=ORDERS)
    eps, _ = get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)
    assert m["epsilon-run"] == pytest.approx(eps, rel=1e-6)
    assert m["epsilon-remaining"] == pytest.approx(20.0 - eps, rel=1e-6)
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite")
    assert ledger.spent("brain") == pytest.approx(eps, rel=1e-6)
    audit = [r for r in worker.audit.read() if r["event"] == "update-sent"][-1]
    assert audit["privacy"]["mode"] == "sample"
    assert audit["privacy"]["epsilon_round"] == pytest.approx(eps, rel=1e-6)
    # the training loss is a mean over the protected examples, not noised: it stays here
    assert "train-loss" not in m and "train-loss" not in audit["metrics"]


ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


def test_round_over_budget_is_refused_with_the_rule(tmp_path: Path) -> None:
    # z = 2, q = 1/2, 2 steps per round: the run's epsilon is 2.06 after one round,
    # 2.81 after two, 3.40 after three (Opacus RDP, delta 1e-5)
    worker = make_worker(tmp_path, epsilon_max=3.0)
    replies = [worker.handle(train_request(dp_run(noise_multiplier=2.0), rnd=r)) for r in (1, 2, 3)]
    assert [r.header["ok"] for r in replies] == [True, True, False]
    assert replies[2].header["rule"] == "privacy.datasets.brain.epsilon_max"
    assert "exceeded" in replies[2].header["reason"]
    spent = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain")
    assert spent == pytest.approx(2.813, abs=2e-3)


@pytest.mark.parametrize(
    ("privacy", "rule"),
    [
        ({"mode": "off"}, "dp_required"),
        ({"noise_multiplier": 0.5}, "min_noise_multiplier"),
        ({"max_grad_norm": 5.0}, "max_clipping_norm"),
    ],
)
def test_run_loosening_the_policy_is_refused(tmp_path: Path, privacy: dict, rule: str) -> None:
    worker = make_worker(tmp_path)
    run = (
        RunConfig(
            secure_aggregation="off",
            task="tiny-seg",
            privacy={"mode": "sample", "noise_multiplier": 1.0, "max_grad_norm": 1.0, **privacy},
        )
        if privacy.get("mode") != "off"
        else RunConfig(secure_aggregation="off", task="tiny-seg")
    )
    reply = worker.handle(train_request(run))
    assert not reply.header["ok"] and reply.header["status"] == "refused"
    assert rule in reply.header["rule"]
    assert not reply.arrays


def eps_rdp(z: float, q: float, steps: int) -> float:
    eps, _ = get_privacy_spent(
        orders=ORDERS,
        rdp=compute_rdp(q=q, noise_multiplier=z, steps=steps, orders=ORDERS),
        delta=1e-5,
    )
    return float(eps)


def test_target_epsilon_sets_each_sites_noise_from_its_own_data(tmp_path: Path) -> None:
    # 3 rounds, batch 16: 24 training examples -> q = 1/2, 2 steps per round;
    # 96 -> q = 1/6, 6 steps. The larger site needs less noise for the same epsilon.
    run = dp_run(noise_multiplier=0.0, target_epsilon=6.0).model_copy(update={"rounds": 3})
    noise, spent = {}, {}
    for n, q, steps in ((32, 1 / 2, 2), (128, 1 / 6, 6)):
        worker = make_worker(tmp_path / str(n), num_samples=n, min_noise_multiplier=0.0)
        replies = [worker.handle(train_request(run, rnd=r)) for r in (1, 2, 3)]
        assert all(r.header["ok"] for r in replies), replies[-1].header
        zs = {r.header["metrics"]["noise-multiplier"] for r in replies}
        assert len(zs) == 1  # one noise level for the whole run
        noise[n] = zs.pop()
        spent[n] = replies[-1].header["metrics"]["epsilon-run"]
        # what the ledger charged = an independent Opacus computation at that noise
        assert spent[n] == pytest.approx(eps_rdp(noise[n], q, 3 * steps), rel=1e-6)
        assert 6.0 - 0.011 <= spent[n] <= 6.0  # Opacus's search tolerance, never above
        audit = [r for r in worker.audit.read() if r["event"] == "update-sent"][-1]
        assert audit["privacy"]["noise_multiplier"] == noise[n]
        assert audit["privacy"]["target_epsilon"] == 6.0
    assert noise[128] < noise[32]
    # a round beyond those the noise was derived for would pass the target: refused
    extra = worker.handle(train_request(run, rnd=4))
    assert extra.header["status"] == "refused"
    assert extra.header["rule"] == "privacy.target_epsilon"
    assert PrivacyLedger(tmp_path / "128" / "privacy" / "ledger.sqlite").spent(
        "brain"
    ) == pytest.approx(spent[128], rel=1e-9)


def test_target_epsilon_in_update_mode_spreads_over_the_runs_rounds(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, min_noise_multiplier=0.0)
    run = RunConfig(
        secure_aggregation="off",
        task="tiny-seg",
        rounds=4,
        privacy={"mode": "update", "target_epsilon": 4.0, "clipping_norm": 0.5},
    )
    reply = worker.handle(train_request(run))
    assert reply.header["ok"], reply.header
    z = reply.header["metrics"]["noise-multiplier"]
    # one Gaussian mechanism per round (q = 1): 4 rounds at z stay within 4.0
    assert 4.0 - 0.011 <= eps_rdp(z, 1.0, 4) <= 4.0
    assert reply.header["metrics"]["epsilon-run"] == pytest.approx(eps_rdp(z, 1.0, 1), rel=1e-6)


def test_target_epsilon_keeps_the_runs_noise_as_a_floor(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, min_noise_multiplier=0.0)
    run = dp_run(noise_multiplier=3.0, target_epsilon=50.0)
    reply = worker.handle(train_request(run))
    assert reply.header["ok"], reply.header
    assert reply.header["metrics"]["noise-multiplier"] == 3.0


def test_target_epsilon_needing_less_noise_than_the_policy_is_refused(tmp_path: Path) -> None:
    worker = make_worker(tmp_path)  # min_noise_multiplier 0.8
    run = dp_run(noise_multiplier=0.0, target_epsilon=200.0)
    reply = worker.handle(train_request(run))
    assert reply.header["status"] == "refused"
    assert reply.header["rule"] == "privacy.datasets.brain.min_noise_multiplier"
    assert "target_epsilon = 200" in reply.header["reason"]
    assert PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain") == 0.0


def test_update_level_dp_noises_the_update(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, min_noise_multiplier=0.0)
    run = RunConfig(
        secure_aggregation="off",
        task="tiny-seg",
        privacy={"mode": "update", "noise_multiplier": 1.0, "clipping_norm": 0.5},
    )
    request = train_request(run)
    reply = worker.handle(request)
    assert reply.header["ok"], reply.header
    delta = reply.arrays[WEIGHTS_KEY] - request.arrays[WEIGHTS_KEY]
    # noise std = 1.0 * 0.5 per coordinate dominates the clipped update
    assert np.std(delta) == pytest.approx(0.5, rel=0.1)
    assert reply.header["metrics"]["epsilon"] > 0
    assert "train-loss" not in reply.header["metrics"]


def test_site_without_budget_refuses_dp_but_allows_plain_runs(tmp_path: Path) -> None:
    cfg = validate(SiteConfig, {"site": {"name": "s"}, "data": {"num_samples": 32}}, where="test")
    worker = SiteWorker(cfg, tmp_path / "site.toml")
    plain = RunConfig(secure_aggregation="off", task="tiny-seg")
    sent = worker.handle(train_request(plain)).header
    assert sent["ok"] and sent["metrics"]["train-loss"] > 0  # without DP it is reported
    reply = worker.handle(train_request(dp_run()))
    assert reply.header["status"] == "refused" and reply.header["rule"] == "privacy.datasets"


def join_request(run: RunConfig) -> wire.Frame:
    from medfed.core.secagg import SecAggConfig

    return wire.Frame(
        {
            "op": "query",
            "run_id": 42,
            "config": {
                wire.RUN_CONFIG_KEY: run.to_json(),
                wire.SECAGG_JOIN: json.dumps(SecAggConfig(mode="default").to_dict()),
            },
        }
    )


def secure(run: RunConfig, rounds: int) -> RunConfig:
    return run.model_copy(update={"secure_aggregation": "default", "rounds": rounds})


@pytest.mark.parametrize(
    ("budget", "privacy", "rule"),
    [
        ({"privacy_unit": "patient"}, {}, "privacy.datasets.brain.privacy_unit"),
        ({}, {"noise_multiplier": 0.5}, "privacy.datasets.brain.min_noise_multiplier"),
        ({"epsilon_max": 1.0}, {}, "privacy.datasets.brain.epsilon_max"),  # not even round 1
    ],
)
def test_a_run_the_site_would_refuse_is_refused_when_it_joins(
    tmp_path: Path, budget: dict, privacy: dict, rule: str
) -> None:
    """Refused at the join, before any site trains, and nothing is charged or joined."""
    worker = make_worker(tmp_path, **budget)
    reply = worker.handle(join_request(secure(dp_run(**privacy), rounds=3)))
    assert not reply.header["ok"] and reply.header["status"] == "refused"
    assert reply.header["rule"] == rule
    assert not reply.arrays  # no key advert: the site is not in the run's roster
    assert PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain") == 0.0
    assert [r["rule"] for r in worker.audit.read() if r["event"] == "refused"] == [rule]


def test_the_join_says_how_many_rounds_the_budget_covers(tmp_path: Path) -> None:
    # z = 2, q = 1/2, 2 steps per round: 2.06 after one round, 2.81 after two, 3.40 after 3
    worker = make_worker(tmp_path, epsilon_max=3.0)
    run = secure(dp_run(noise_multiplier=2.0), rounds=5)
    reply = worker.handle(join_request(run))
    assert reply.header["ok"], reply.header
    assert reply.header["metrics"] == {wire.BUDGET_ROUNDS_KEY: 2}
    assert wire.BYTES_PREFIX + "advert" in reply.arrays
    # a run the budget covers whole joins without a note; the join charged nothing
    assert (
        worker.handle(join_request(secure(dp_run(noise_multiplier=2.0), rounds=2))).header[
            "metrics"
        ]
        == {}
    )
    assert PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain") == 0.0


def _rdp_epsilon(noise: float, rounds: int) -> float:
    """Opacus RDP epsilon of ``rounds`` rounds of tiny-seg here: q = 1/2, 2 steps each."""
    rdp = compute_rdp(q=0.5, noise_multiplier=noise, steps=2 * rounds, orders=ORDERS)
    return get_privacy_spent(orders=ORDERS, rdp=rdp, delta=1e-5)[0]


def test_a_site_may_fit_a_run_to_its_remaining_budget_with_more_noise(tmp_path: Path) -> None:
    """With max_fitted_noise_multiplier, a run that would take the dataset past epsilon_max
    is trained whole with the least noise that fits, and every round fits the budget."""
    # z = 2 over 3 rounds: 3.40 > 3.0; the same noise for all 3 rounds fits at about z = 2.2
    worker = make_worker(tmp_path, epsilon_max=3.0, max_fitted_noise_multiplier=4.0)
    run = secure(dp_run(noise_multiplier=2.0), rounds=3)
    joined = worker.handle(join_request(run))
    assert joined.header["ok"], joined.header
    fitted = joined.header["metrics"][wire.FITTED_NOISE_KEY]
    assert wire.BUDGET_ROUNDS_KEY not in joined.header["metrics"]  # it covers every round
    # the least noise: an independent Opacus computation puts it at the budget's edge
    assert _rdp_epsilon(fitted, 3) <= 3.0 < _rdp_epsilon(fitted * 0.99, 3)
    plain = run.model_copy(update={"secure_aggregation": "off"})  # the same rounds, unmasked
    replies = [worker.handle(train_request(plain, rnd=r)) for r in (1, 2, 3)]
    assert [r.header["ok"] for r in replies] == [True, True, True]
    noises = [r.header["metrics"]["noise-multiplier"] for r in replies]
    assert noises == [fitted] * 3  # one noise for the run's rounds
    spent = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite").spent("brain")
    assert _rdp_epsilon(fitted, 3) * 0.999 <= spent <= 3.0
    audit = [r for r in worker.audit.read() if r["event"] == "update-sent"]
    assert [a["privacy"]["noise_fitted_to_budget"] for a in audit] == [True] * 3


def test_another_runs_spend_mid_run_raises_the_fitted_noise(tmp_path: Path) -> None:
    """The fit is asked again each round: what another run spent in between counts."""
    worker = make_worker(tmp_path, epsilon_max=3.0, max_fitted_noise_multiplier=4.0)
    run = dp_run(noise_multiplier=2.0).model_copy(update={"rounds": 3})
    first = worker.handle(train_request(run, rnd=1)).header["metrics"]["noise-multiplier"]
    ledger = PrivacyLedger(tmp_path / "privacy" / "ledger.sqlite")
    _, budget = worker.privacy.policy.budget_for("brain")
    ledger.reserve(
        "other", 1, "brain", budget=budget, round_history=[(8.0, 0.5, 2)], delta=1e-5
    )  # another coordinator's run, between this run's rounds
    replies = [worker.handle(train_request(run, rnd=r)).header for r in (2, 3)]
    assert [r["ok"] for r in replies] == [True, True]
    later = [r["metrics"]["noise-multiplier"] for r in replies]
    assert later[0] > first and later[1] == later[0]
    assert ledger.spent("brain") <= 3.0


@pytest.mark.parametrize("cap", [0.0, 2.1])
def test_without_room_under_the_cap_the_site_refuses_rounds_as_usual(
    tmp_path: Path, cap: float
) -> None:
    """No fitting when the policy does not allow it (0), or when even the cap does not fit."""
    worker = make_worker(tmp_path, epsilon_max=3.0, max_fitted_noise_multiplier=cap)
    run = secure(dp_run(noise_multiplier=2.0), rounds=3)
    joined = worker.handle(join_request(run))
    assert joined.header["metrics"] == {wire.BUDGET_ROUNDS_KEY: 2}
    plain = run.model_copy(update={"secure_aggregation": "off"})
    replies = [worker.handle(train_request(plain, rnd=r)) for r in (1, 2, 3)]
    assert [r.header["ok"] for r in replies] == [True, True, False]
    assert replies[0].header["metrics"]["noise-multiplier"] == 2.0
    assert replies[2].header["rule"] == "privacy.datasets.brain.epsilon_max"


def test_a_run_that_fits_as_asked_keeps_its_noise(tmp_path: Path) -> None:
    worker = make_worker(tmp_path, epsilon_max=3.0, max_fitted_noise_multiplier=4.0)
    run = secure(dp_run(noise_multiplier=2.0), rounds=2)  # 2.81 <= 3.0
    assert worker.handle(join_request(run)).header["metrics"] == {}
    reply = worker.handle(train_request(run.model_copy(update={"secure_aggregation": "off"})))
    assert reply.header["metrics"]["noise-multiplier"] == 2.0
