"""The privacy ledger is bound to the audit log: deleting, replacing, rolling back or
damaging it refuses every DP round with the fix, never resets the budget; the fix
(`medfed site budget --rebuild-from-audit`) restores it from the audit log, audited."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.client.audit import AuditLog
from medfed.client.ledger import (
    LedgerDamaged,
    LedgerError,
    LedgerMismatch,
    LedgerMissing,
    PrivacyLedger,
)
from medfed.client.privacy_guard import (
    LEDGER_RULE,
    PrivacyGate,
    PrivacyRefusal,
    RoundPrivacy,
    rebuild_ledger,
)
from medfed.core.config import RunConfig, SiteConfig, load_toml
from medfed.core.privacy_accounting import epsilon_of_history

SITE_TOML = """
[site]
name = "{name}"

[privacy]
default = "brain"

[privacy.datasets.brain]
epsilon_max = {eps}
delta = 1e-5
dp_required = false

[privacy.datasets.lung]
epsilon_max = {eps}
delta = 1e-5
dp_required = false
"""


def make_site(root: Path, name: str = "site-a", eps: float = 20.0) -> tuple[SiteConfig, Path]:
    root.mkdir(parents=True, exist_ok=True)
    config = root / "site.toml"
    config.write_text(SITE_TOML.format(name=name, eps=eps))
    return load_toml(config, SiteConfig), config


def dp_run(z: float = 3.0, rounds: int = 5, dataset: str = "") -> RunConfig:
    # update-level DP: one Gaussian mechanism per round (q = 1, one step): no model needed
    return RunConfig(
        task="tiny-seg",
        rounds=rounds,
        secure_aggregation="off",
        dataset=dataset,
        privacy={"mode": "update", "noise_multiplier": z, "clipping_norm": 0.5},
    )


def plain_run() -> RunConfig:
    return RunConfig(task="tiny-seg", secure_aggregation="off")


def dp_round(
    gate: PrivacyGate, run: RunConfig, run_id: str, rnd: int, *, sent: bool = True
) -> RoundPrivacy:
    """One round as the worker runs it: reserve (audited), train, commit, audit the reply."""
    rp = gate.before_training(
        run, run_id, rnd, model=None, num_examples=32, batch_size=16, epochs=1
    )
    if sent:
        gate.commit(rp, steps=1)
        gate.audit.record("update-sent", run_id=run_id, round=rnd, privacy=rp.record(run, 1))
    return rp


def refusal(gate: PrivacyGate, run: RunConfig, rnd: int = 9) -> PrivacyRefusal:
    with pytest.raises(PrivacyRefusal) as caught:
        gate.before_training(run, "next", rnd, model=None, num_examples=32, batch_size=16, epochs=1)
    return caught.value


def ledger_path(config: Path) -> Path:
    return config.parent / "privacy" / "ledger.sqlite"


def remove_ledger(config: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        Path(str(ledger_path(config)) + suffix).unlink(missing_ok=True)


def test_a_new_ledger_is_named_in_the_audit_log_and_each_reservation_audited(
    tmp_path: Path,
) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    rp = dp_round(gate, dp_run(), "r1", 1)
    dp_round(gate, dp_run(), "r1", 2, sent=False)  # died before sending
    events = [r["event"] for r in gate.audit.read()]
    assert events == ["ledger-created", "privacy-reserved", "update-sent", "privacy-reserved"]
    created, reserved = gate.audit.read()[:2]
    assert created["ledger_id"] == gate.ledger.ledger_id == rp.ledger_id
    assert reserved["record"] == rp.reservation.record_id and reserved["history"] == [[3.0, 1.0, 1]]
    assert reserved["epsilon"] == pytest.approx(epsilon_of_history([(3.0, 1.0, 1)], 1e-5))
    assert gate.audit.read()[2]["privacy"]["ledger_record"] == rp.reservation.record_id


def test_a_deleted_ledger_refuses_dp_rounds_and_joins_and_is_not_recreated(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    dp_round(PrivacyGate(cfg, config), dp_run(), "r1", 1)
    remove_ledger(config)
    gate = PrivacyGate(cfg, config)  # the restarted daemon
    problem = gate.check_at_start()
    assert isinstance(problem, LedgerMissing)
    assert gate.audit.read()[-1]["event"] == "ledger-refused"
    refused = refusal(gate, dp_run())
    assert refused.rule == LEDGER_RULE == "privacy.ledger"
    assert "missing" in refused.reason and "--rebuild-from-audit" in refused.reason
    assert "brain: epsilon" in refused.reason  # what the audit log says was spent
    with pytest.raises(PrivacyRefusal) as join:  # a DP join is refused as well
        gate.preflight(
            dp_run().model_copy(update={"secure_aggregation": "default"}),
            "r2",
            model=None,
            num_examples=32,
            batch_size=16,
            epochs=1,
        )
    assert join.value.rule == LEDGER_RULE
    assert not ledger_path(config).exists()  # never a silent reset to an empty ledger
    # runs without DP go on
    plain = gate.before_training(
        plain_run(), "p", 1, model=None, num_examples=32, batch_size=16, epochs=1
    )
    assert plain.mode == "off" and plain.reservation is None


def test_a_ledger_deleted_while_the_daemon_runs_is_not_recreated_by_sqlite(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    dp_round(gate, dp_run(), "r1", 1)
    remove_ledger(config)
    assert refusal(gate, dp_run()).rule == LEDGER_RULE
    with pytest.raises(LedgerMissing):
        gate.ledger.spent("brain")  # the open ledger object does not make a new file either
    assert not ledger_path(config).exists()


def test_a_ledger_replaced_by_another_sites_ledger_is_refused(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path / "a")
    dp_round(PrivacyGate(cfg, config), dp_run(), "r1", 1)
    other_cfg, other = make_site(tmp_path / "b", name="site-b")
    for rnd in (1, 2, 3):  # spent more, so only its identity gives it away
        dp_round(PrivacyGate(other_cfg, other), dp_run(), "r1", rnd)
    remove_ledger(config)
    shutil.copy(ledger_path(other), ledger_path(config))
    refused = refusal(PrivacyGate(cfg, config), dp_run())
    assert refused.rule == LEDGER_RULE and "replaced" in refused.reason
    with pytest.raises(LedgerMismatch):
        PrivacyGate(cfg, config).ledger  # noqa: B018


def test_an_older_copy_of_the_ledger_is_refused(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    dp_round(gate, dp_run(), "r1", 1)
    backup = tmp_path / "backup.sqlite"
    shutil.copy(ledger_path(config), backup)
    dp_round(gate, dp_run(), "r1", 2)
    remove_ledger(config)
    shutil.copy(backup, ledger_path(config))  # same identity, one round less
    refused = refusal(gate, dp_run())
    assert refused.rule == LEDGER_RULE
    assert "less epsilon" in refused.reason and "'r1' round 2" in refused.reason


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_ledger_refuses_dp_with_the_fix_not_a_database_error(
    tmp_path: Path, damage: str
) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    for rnd in (1, 2):
        dp_round(gate, dp_run(), "r1", rnd)
    path = ledger_path(config)
    data = path.read_bytes()
    path.write_bytes(
        {
            "garbage": b"not a database, just bytes " * 300,
            "truncated": data[: len(data) // 2],
            "empty": b"",
        }[damage]
    )
    refused = refusal(PrivacyGate(cfg, config), dp_run())
    assert refused.rule == LEDGER_RULE
    assert "DatabaseError" not in refused.reason and "--rebuild-from-audit" in refused.reason
    assert "cannot be read" in refused.reason or "empty" in refused.reason
    with pytest.raises(LedgerDamaged):
        PrivacyGate(cfg, config).ledger  # noqa: B018
    assert (
        PrivacyGate(cfg, config)
        .before_training(plain_run(), "p", 1, model=None, num_examples=32, batch_size=16, epochs=1)
        .mode
        == "off"
    )


def test_rebuild_restores_each_run_and_dataset_and_is_audited(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    for rnd in (1, 2):
        dp_round(gate, dp_run(), "r1", rnd)
    dp_round(gate, dp_run(z=4.0), "r2", 1)
    dp_round(gate, dp_run(z=4.0, dataset="lung"), "r2", 1)
    dp_round(gate, dp_run(), "r1", 3, sent=False)  # reserved, then the site died
    before = {d: gate.ledger.spent(d) for d in ("brain", "lung")}
    runs = {
        (r.run_id, r.dataset): (round(r.epsilon, 12), r.rounds, r.reserved)
        for r in gate.ledger.summary().runs
    }
    history = gate.ledger.run_history("r1", "brain")
    path = ledger_path(config)
    path.write_bytes(b"\x00" * 4096)  # damaged

    done = rebuild_ledger(cfg, config)
    assert [a.name for a in done.kept_aside] == [
        f"ledger.sqlite.damaged-{done.kept_aside[0].name.split('-')[-1]}"
    ]
    assert done.kept_aside[0].read_bytes() == b"\x00" * 4096  # kept, never deleted
    assert {d.dataset: (d.epsilon, d.runs, d.rounds, d.unsent) for d in done.result.datasets} == {
        "brain": (pytest.approx(before["brain"], rel=1e-12), 2, 4, 1),
        "lung": (pytest.approx(before["lung"], rel=1e-12), 1, 1, 0),
    }
    ledger = PrivacyLedger(path)
    assert {d: ledger.spent(d) for d in before} == pytest.approx(before, rel=1e-12)
    assert {
        (r.run_id, r.dataset): (round(r.epsilon, 12), r.rounds, r.reserved)
        for r in ledger.summary().runs
    } == runs
    assert ledger.run_history("r1", "brain") == history  # the run composes on as before
    rebuilt = gate.audit.read()[-1]
    assert rebuilt["event"] == "ledger-rebuilt" and rebuilt["ledger_id"] == ledger.ledger_id
    assert "cannot be read" in rebuilt["problem"]
    assert rebuilt["restored"]["brain"]["rounds"] == 4
    assert gate.audit.verify().intact

    # DP rounds run again, and r1's next round composes on its restored history
    rp = dp_round(PrivacyGate(cfg, config), dp_run(), "r1", 4)
    assert rp.reservation.run_epsilon == pytest.approx(
        epsilon_of_history([(3.0, 1.0, 1)] * 4, 1e-5), rel=1e-9
    )
    # the rebuilt ledger is the one the audit log names now; the site runs on
    assert PrivacyGate(cfg, config).check_at_start() is None


def test_rebuild_from_a_log_written_before_reservations_were_audited(tmp_path: Path) -> None:
    """update-sent records without ledger ids (older sites) are read as committed spends."""
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    for rnd in (1, 2):
        dp_round(gate, dp_run(), "old", rnd)
    spent = gate.ledger.spent("brain")
    log = gate.audit
    legacy = []
    for r in log.read():  # rewrite the log as an older site wrote it: no chain, no ids
        if r["event"] == "update-sent":
            r = {k: v for k, v in r.items() if k not in ("seq", "prev")}
            r["privacy"] = {
                k: v for k, v in r["privacy"].items() if k not in ("ledger_id", "ledger_record")
            }
            legacy.append(json.dumps(r, sort_keys=True))
    log.path.write_text("\n".join(legacy) + "\n")
    gate = PrivacyGate(cfg, config)
    assert gate.check_at_start() is None  # the ledger is adopted
    assert gate.audit.read()[-1]["event"] == "ledger-adopted"
    remove_ledger(config)
    assert refusal(PrivacyGate(cfg, config), dp_run()).rule == LEDGER_RULE
    done = rebuild_ledger(cfg, config)
    assert done.result.legacy == 2 and done.kept_aside == []
    assert PrivacyLedger(ledger_path(config)).spent("brain") == pytest.approx(spent, rel=1e-12)


def test_rebuild_refuses_when_nothing_is_wrong_or_the_audit_chain_is_broken(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    for rnd in (1, 2):
        dp_round(gate, dp_run(), "r1", rnd)
    with pytest.raises(LedgerError, match="nothing to rebuild"):
        rebuild_ledger(cfg, config)
    remove_ledger(config)
    audit = AuditLog(config.parent / "audit.jsonl")
    raw = audit.path.read_bytes().split(b"\n")
    del raw[2]  # a spend removed from the audit log, then the ledger deleted
    audit.path.write_bytes(b"\n".join(raw))
    with pytest.raises(LedgerError, match="chain is broken") as caught:
        rebuild_ledger(cfg, config)
    assert "--verify" in caught.value.fix
    assert not ledger_path(config).exists()


def test_holds_return_with_a_rebuild(tmp_path: Path) -> None:
    cfg, config = make_site(tmp_path)
    gate = PrivacyGate(cfg, config)
    secure = dp_run(rounds=3).model_copy(update={"secure_aggregation": "default"})
    gate.preflight(secure, "live", model=None, num_examples=32, batch_size=16, epochs=1)
    gate.preflight(secure, "ended", model=None, num_examples=32, batch_size=16, epochs=1)
    gate.release("ended", reason="run ended")
    dp_round(gate, secure, "live", 1)
    held = {h.run_id: h.epsilon for h in gate.ledger.holds()}
    remove_ledger(config)
    done = rebuild_ledger(cfg, config)
    assert [(r, d) for r, d, _ in done.result.holds] == [("live", "brain")]
    assert {h.run_id: h.epsilon for h in PrivacyLedger(ledger_path(config)).holds()} == {
        "live": pytest.approx(held["live"])
    }


# ------------------------------------------------------------------------ command line


def test_site_budget_on_a_corrupt_ledger_says_what_where_and_the_fix(tmp_path: Path) -> None:
    from medfed.cli import site_cmd

    cfg, config = make_site(tmp_path)
    dp_round(PrivacyGate(cfg, config), dp_run(), "r1", 1)
    ledger_path(config).write_bytes(b"garbage" * 1000)
    out = CliRunner().invoke(site_cmd.app, ["budget", "--config", str(config)])
    assert out.exit_code == 2, out.output
    assert "Traceback" not in out.output and "DatabaseError" not in out.output
    assert "cannot be read" in out.output and "where:" in out.output
    assert str(ledger_path(config)) in out.output
    assert f"medfed site budget --config {config} --rebuild-from-audit" in out.output

    out = CliRunner().invoke(
        site_cmd.app, ["budget", "--config", str(config), "--rebuild-from-audit"]
    )
    assert out.exit_code == 0, out.output
    assert "rebuilt" in out.output and "damaged-" in out.output
    assert "brain" in out.output
    out = CliRunner().invoke(site_cmd.app, ["budget", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.output
    spent = json.loads(out.output)["datasets"]["brain"]["spent"]
    assert spent == pytest.approx(epsilon_of_history([(3.0, 1.0, 1)], 1e-5))


def test_site_budget_without_a_ledger_shows_nothing_spent_and_creates_nothing(
    tmp_path: Path,
) -> None:
    from medfed.cli import site_cmd

    _, config = make_site(tmp_path)
    out = CliRunner().invoke(site_cmd.app, ["budget", "--config", str(config), "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["datasets"]["brain"]["spent"] == 0.0
    assert not ledger_path(config).exists()


def test_site_budget_in_a_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    cfg, config = make_site(tmp_path)
    dp_round(PrivacyGate(cfg, config), dp_run(), "r1", 1)
    with sqlite3.connect(tmp_path / "elsewhere.sqlite") as con:  # another file, same name
        con.execute("CREATE TABLE t (x)")
    shutil.copy(tmp_path / "elsewhere.sqlite", ledger_path(config))
    out = subprocess.run(
        [sys.executable, "-m", "medfed", "site", "budget", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "not a privacy ledger" in out.stderr
    assert "--rebuild-from-audit" in out.stderr
