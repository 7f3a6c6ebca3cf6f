"""A site's join holds the run's planned epsilon: concurrent DP runs on one dataset are
admitted only while both fit; the hold ends with the run, or expires."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from medfed.client.ledger import HOLD_MAX_S, HOLD_MIN_S, PrivacyLedger, hold_ttl
from medfed.client.privacy_guard import Forecast, PrivacyGate, PrivacyRefusal
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, load_toml
from medfed.core.privacy_accounting import epsilon_of_history

SITE_TOML = """
[site]
name = "s"

[privacy]
default = "brain"

[privacy.datasets.brain]
epsilon_max = {eps}
delta = 1e-5
"""
Z = 3.0  # update-level, one Gaussian mechanism per round: 1.386 after 1 round, 2.029 after 2


def eps(rounds: int) -> float:
    return epsilon_of_history([(Z, 1.0, 1)] * rounds, 1e-5)


def make_gate(tmp_path: Path, epsilon_max: float) -> tuple[PrivacyGate, Path]:
    config = tmp_path / "site.toml"
    config.write_text(SITE_TOML.format(eps=epsilon_max))
    return PrivacyGate(load_toml(config, SiteConfig), config), config


def secure_run(rounds: int = 2, timeout: float = 600.0) -> RunConfig:
    return RunConfig(
        task="tiny-seg",
        rounds=rounds,
        secure_aggregation="default",
        round_timeout_s=timeout,
        privacy={"mode": "update", "noise_multiplier": Z, "clipping_norm": 0.5},
    )


def join(gate: PrivacyGate, run_id: str, run: RunConfig | None = None) -> Forecast | None:
    return gate.preflight(
        run or secure_run(), run_id, model=None, num_examples=32, batch_size=16, epochs=1
    )


def train(gate: PrivacyGate, run_id: str, rnd: int) -> float:
    rp = gate.before_training(
        secure_run(), run_id, rnd, model=None, num_examples=32, batch_size=16, epochs=1
    )
    gate.commit(rp, steps=1)
    return rp.reservation.epsilon


def test_the_second_run_that_does_not_fit_beside_the_first_is_refused_at_join(
    tmp_path: Path,
) -> None:
    gate, _ = make_gate(tmp_path, epsilon_max=3.0)  # one 2-round run fits (2.03), two do not
    assert join(gate, "run-a") == Forecast(2, Z)
    (hold,) = gate.ledger.holds()
    assert (hold.run_id, hold.epsilon, hold.outstanding) == (
        "run-a",
        pytest.approx(eps(2)),
        pytest.approx(eps(2)),
    )
    assert gate.ledger.spent("brain") == 0.0  # a hold is not a spend
    with pytest.raises(PrivacyRefusal) as caught:
        join(gate, "run-b")
    assert caught.value.rule == "privacy.datasets.brain.epsilon_max"
    assert "run 'run-a' holds 2.029" in caught.value.reason
    assert [h.run_id for h in gate.ledger.holds()] == ["run-a"]  # the refused run holds nothing
    events = [(r["event"], r.get("run_id")) for r in gate.audit.read()]
    assert ("privacy-hold", "run-a") in events and ("privacy-hold", "run-b") not in events


def test_runs_that_fit_together_are_both_admitted_and_each_draws_on_its_own_hold(
    tmp_path: Path,
) -> None:
    gate, _ = make_gate(tmp_path, epsilon_max=2 * eps(2) + 0.01)
    assert join(gate, "run-a").rounds == 2 and join(gate, "run-b").rounds == 2
    # each run's rounds are charged against its own hold, never refused for the other's
    spent = [train(gate, run, rnd) for rnd in (1, 2) for run in ("run-a", "run-b")]
    assert sum(spent) == pytest.approx(2 * eps(2))
    assert all(h.outstanding == pytest.approx(0.0, abs=1e-9) for h in gate.ledger.holds())
    # a third run finds no room: the dataset has spent what the two held
    with pytest.raises(PrivacyRefusal, match="exceeded"):
        join(gate, "run-c")


def test_the_hold_is_released_when_the_run_ends_and_the_next_run_then_fits(tmp_path: Path) -> None:
    gate, config = make_gate(tmp_path, epsilon_max=3.0)
    join(gate, "run-a")
    train(gate, "run-a", 1)  # spent 1.386 of its 2.029
    with pytest.raises(PrivacyRefusal):
        join(gate, "run-b")
    released = gate.release("run-a", reason="run ended")
    assert [h.run_id for h in released] == ["run-a"] and not gate.ledger.holds()
    assert gate.audit.read()[-1]["event"] == "privacy-hold-released"
    # run-a stopped after one round: what it spent stays spent; the rest is free again
    assert join(gate, "run-b") == Forecast(1, Z)  # 1.386 + 1.386 <= 3; two rounds would not


def test_an_expired_hold_no_longer_blocks_and_is_shown_as_expired(tmp_path: Path) -> None:
    from medfed.cli import site_cmd

    gate, config = make_gate(tmp_path, epsilon_max=3.0)
    join(gate, "crashed")  # its server died: the run never ends
    with sqlite3.connect(config.parent / "privacy" / "ledger.sqlite") as con:
        con.execute("UPDATE holds SET expires = '2000-01-01T00:00:00+00:00'")
    assert join(gate, "run-b").rounds == 2
    out = CliRunner().invoke(site_cmd.app, ["budget", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.output
    said = json.loads(out.output)
    assert {h["run_id"]: h["expired"] for h in said["holds"]} == {"crashed": True, "run-b": False}
    assert said["datasets"]["brain"]["held"] == pytest.approx(eps(2))
    out = CliRunner().invoke(
        site_cmd.app, ["budget", "--config", str(config)], env={"COLUMNS": "120"}
    )
    assert out.exit_code == 0, out.output
    assert "holds of joined runs" in out.output and "(expired)" in out.output


def test_a_hold_lasts_for_the_runs_remaining_rounds_and_each_round_renews_it(
    tmp_path: Path,
) -> None:
    assert hold_ttl(3, 600.0) == 3600.0  # 2 x 3 x 600 s
    assert hold_ttl(1, 10.0) == HOLD_MIN_S and hold_ttl(10_000, 600.0) == HOLD_MAX_S
    gate, config = make_gate(tmp_path, epsilon_max=30.0)
    join(gate, "long", secure_run(rounds=10, timeout=3600.0))
    with sqlite3.connect(config.parent / "privacy" / "ledger.sqlite") as con:
        con.execute("UPDATE holds SET expires = '2999-01-01T00:00:00+00:00'")
    train(gate, "long", 1)
    (hold,) = PrivacyLedger(config.parent / "privacy" / "ledger.sqlite").holds()
    import datetime as dt

    left = dt.datetime.fromisoformat(hold.expires) - dt.datetime.now(dt.timezone.utc)
    assert 2 * 9 * 3600 - 60 < left.total_seconds() <= 2 * 9 * 3600  # 9 rounds to go


def test_a_run_refused_when_it_joins_again_gives_up_its_earlier_hold(tmp_path: Path) -> None:
    gate, _ = make_gate(tmp_path, epsilon_max=3.0)
    join(gate, "run-a")
    looser = secure_run().model_copy(
        update={"privacy": secure_run().privacy.model_copy(update={"noise_multiplier": 0.1})}
    )
    with pytest.raises(PrivacyRefusal):  # 0.1 noise on a 3.0 budget: not even one round
        join(gate, "run-a", looser)
    assert gate.ledger.holds() == []


# ------------------------------------------------------------------------------ worker


def _site_worker(tmp_path: Path):  # noqa: ANN202 - a SiteWorker
    """A site worker whose one dataset has a budget of epsilon 3."""
    from medfed.client.worker import SiteWorker
    from medfed.core.config import validate

    cfg = validate(
        SiteConfig,
        {
            "site": {"name": "site-x"},
            "data": {"num_samples": 32},
            "compute": {"threads": 1},
            "privacy": {"default": "brain", "datasets": {"brain": {"epsilon_max": 3.0}}},
        },
        where="test",
    )
    return SiteWorker(cfg, tmp_path / "site.toml")


def test_the_worker_holds_at_join_and_releases_at_the_end_of_the_run(tmp_path: Path) -> None:
    from medfed.core.packing import WEIGHTS_KEY, pack
    from medfed.core.secagg import SecAggConfig
    from medfed.tasks import engine, get_task

    worker = _site_worker(tmp_path)
    run = secure_run()

    def query(run_id: int) -> wire.Frame:
        return worker.handle(
            wire.Frame(
                {
                    "op": "query",
                    "run_id": run_id,
                    "config": {
                        wire.RUN_CONFIG_KEY: run.to_json(),
                        wire.SECAGG_JOIN: json.dumps(SecAggConfig(mode="default").to_dict()),
                    },
                }
            )
        )

    assert query(41).header["ok"]
    second = query(42).header
    assert second["status"] == "refused" and "run '41' holds" in second["reason"]
    torch.manual_seed(0)
    weights = {WEIGHTS_KEY: pack(engine.get_weights(get_task(run.task).build_model()))}
    ended = worker.handle(
        wire.Frame(
            {
                "op": "evaluate",
                "run_id": 41,
                "config": {wire.RUN_CONFIG_KEY: run.to_json(), wire.SERVER_ROUND_KEY: run.rounds},
            },
            weights,
        )
    )
    assert ended.header["ok"], ended.header
    events = [r["event"] for r in worker.audit.read()]
    assert events[-2:] == ["secure-aggregation-ended", "privacy-hold-released"]
    assert query(42).header["ok"]  # run 41 ended: run 42 fits now


def test_a_run_the_server_ended_early_releases_its_hold_and_keys(tmp_path: Path) -> None:
    from medfed.core.secagg import SecAggConfig

    worker = _site_worker(tmp_path)
    run = secure_run()

    def query(run_id: int, **config: str) -> wire.Frame:
        return worker.handle(
            wire.Frame(
                {
                    "op": "query",
                    "run_id": run_id,
                    "config": {wire.RUN_CONFIG_KEY: run.to_json(), **config},
                }
            )
        )

    join = {wire.SECAGG_JOIN: json.dumps(SecAggConfig(mode="default").to_dict())}
    assert query(41, **join).header["ok"]
    assert worker.secure.store.load("41") is not None
    assert query(42, **join).header["status"] == "refused"
    # the other sites refused: the server ends run 41 at set-up and says so
    assert query(41, **{wire.RUN_ENDED: "refused"}).header["ok"]
    records = worker.audit.read()
    assert [r["event"] for r in records][-2:] == [
        "secure-aggregation-ended",
        "privacy-hold-released",
    ]
    assert records[-1]["reason"] == "run refused at the server"
    assert worker.secure.store.load("41") is None  # its secret key is gone
    assert query(42, **join).header["ok"]  # its budget is free again


def test_a_changed_peer_key_is_refused_before_the_site_trains_or_spends(tmp_path: Path) -> None:
    """The peers come first: a key the site cannot accept refuses the round, nothing spent."""
    from medfed.core.packing import WEIGHTS_KEY, pack
    from medfed.core.schema import SiteInstruction
    from medfed.core.secagg import SecAggConfig, SiteIdentity
    from medfed.tasks import engine, get_task

    worker = _site_worker(tmp_path)
    run = secure_run()
    joined = worker.handle(
        wire.Frame(
            {
                "op": "query",
                "run_id": 41,
                "config": {
                    wire.RUN_CONFIG_KEY: run.to_json(),
                    wire.SECAGG_JOIN: json.dumps(SecAggConfig(mode="default").to_dict()),
                },
            }
        )
    )
    assert joined.header["ok"], joined.header
    before, after = SiteIdentity.generate(), SiteIdentity.generate()
    worker.secure.pins.add({"site-y": before.public_bytes}, ["site-y"], run_id="40")
    asked = SiteInstruction(
        directory={
            "site-x": worker.secure.identity.public_bytes.hex(),
            "site-y": after.public_bytes.hex(),
        },
        roster=b"the roster is read after the keys",
    )
    weights = {WEIGHTS_KEY: pack(engine.get_weights(get_task(run.task).build_model()))}
    reply = worker.handle(
        wire.Frame(
            {
                "op": "train",
                "run_id": 41,
                "config": {
                    wire.RUN_CONFIG_KEY: run.to_json(),
                    wire.SERVER_ROUND_KEY: 1,
                    **asked.entries(),
                },
            },
            weights,
        )
    )
    assert reply.header["status"] == "refused", reply.header
    assert reply.header["rule"] == "secagg.peer_key" and "site-y" in reply.header["reason"]
    events = [r["event"] for r in worker.audit.read()]
    assert events[-1] == "refused" and "privacy-reserved" not in events
