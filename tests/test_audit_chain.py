"""The site's audit log is hash-chained: edits, insertions and deletions are evident, a torn
line from a crash never swallows the next record, and `medfed site audit --verify` says so."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medfed.client.audit import GENESIS, TORN_EVENT, AuditLog, line_hash

SITE_TOML = '[site]\nname = "s"\n'


def log_with(tmp_path: Path, n: int = 4) -> AuditLog:
    log = AuditLog(tmp_path / "audit.jsonl")
    for i in range(n):
        log.record("update-sent", run_id=7, round=i + 1, bytes=100 + i)
    return log


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().split(b"\n")[:-1]


def test_each_record_links_to_the_line_before_it(tmp_path: Path) -> None:
    log = log_with(tmp_path)
    raw = lines(log)
    records = [json.loads(x) for x in raw]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    assert [r["prev"] for r in records[1:]] == [line_hash(x) for x in raw[:-1]]
    v = log.verify()
    assert v.intact and (v.records, v.chained, v.legacy) == (4, 4, 0) and not v.torn
    assert v.head == line_hash(raw[-1]) and v.head_seq == 4


@pytest.mark.parametrize("tamper", ["edit", "delete", "insert", "unchained"])
def test_an_edited_deleted_or_inserted_line_breaks_the_chain(tmp_path: Path, tamper: str) -> None:
    log = log_with(tmp_path)
    raw = lines(log)
    if tamper == "edit":  # a smaller update than was sent
        raw[1] = raw[1].replace(b'"bytes": 101', b'"bytes": 1')
    elif tamper == "delete":
        del raw[1]
    elif tamper == "insert":
        raw.insert(
            2,
            json.dumps(
                {
                    "event": "update-sent",
                    "seq": 3,
                    "prev": line_hash(raw[1]),
                    "time": "2026-01-01T00:00:00+00:00",
                }
            ).encode(),
        )
    else:  # a record without a link after the chain began
        raw.insert(2, b'{"event": "forged", "time": "2026-01-01T00:00:00+00:00"}')
    log.path.write_bytes(b"\n".join(raw) + b"\n")
    v = log.verify()
    assert not v.intact
    # the break shows at the first record whose link no longer matches the line before it
    assert v.breaks[0].line == {"edit": 3, "delete": 2, "insert": 4, "unchained": 3}[tamper]
    if tamper != "unchained":
        assert v.breaks[0].expected != v.breaks[0].found


def test_a_line_edited_into_garbage_is_not_mistaken_for_a_torn_line(tmp_path: Path) -> None:
    log = log_with(tmp_path)
    raw = lines(log)
    raw[1] = raw[1][:20]  # no longer a record: the chain still notices what was there
    log.path.write_bytes(b"\n".join(raw) + b"\n")
    v = log.verify()
    assert [t.line for t in v.torn] == [2] and not v.torn[0].noted
    assert not v.intact and v.breaks[0].line == 3


def test_a_torn_last_line_is_ended_and_noted_and_the_next_record_stays_whole(
    tmp_path: Path,
) -> None:
    log = log_with(tmp_path, 2)
    good = lines(log)
    with open(log.path, "ab") as fh:  # the daemon died while writing a record
        fh.write(b'{"event": "update-sent", "privacy": {"epsil')
    v = log.verify()
    assert v.intact and [(t.line, t.terminated) for t in v.torn] == [(3, False)]
    assert [r["event"] for r in log.read()] == ["update-sent"] * 2

    after = AuditLog(log.path)  # the restarted daemon
    after.record("daemon-started", site="s")
    records = after.read()
    assert [r["event"] for r in records] == [
        "update-sent",
        "update-sent",
        TORN_EVENT,
        "daemon-started",
    ]
    note = records[2]
    torn = lines(after)[2]
    assert note["hash"] == line_hash(torn) and note["bytes"] == len(torn)
    assert note["offset"] == sum(len(x) + 1 for x in good)
    assert note["prev"] == line_hash(good[-1])  # the chain skips the fragment
    assert records[3]["site"] == "s" and records[3]["prev"] == line_hash(lines(after)[3])
    v = after.verify()
    assert v.intact and v.records == 4
    assert [(t.line, t.terminated, t.noted) for t in v.torn] == [(3, True, True)]


def test_a_last_record_that_only_lost_its_newline_is_kept_as_a_record(tmp_path: Path) -> None:
    log = log_with(tmp_path, 2)
    log.path.write_bytes(log.path.read_bytes()[:-1])  # cut after the JSON, before "\n"
    log2 = AuditLog(log.path)
    log2.record("next")
    assert [r["event"] for r in log2.read()] == ["update-sent", "update-sent", "next"]
    v = log2.verify()
    assert v.intact and not v.torn and v.head_seq == 3


def test_a_log_written_before_the_chain_still_reads_and_the_chain_continues_it(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.jsonl"
    old = [
        {"event": "update-sent", "time": "2026-01-01T00:00:00+00:00", "round": r} for r in (1, 2)
    ]
    glued = (
        b'{"event": "update-sent", "ti'  # the old writer's torn line, glued onto the next
        + json.dumps(
            {"event": "refused", "time": "2026-01-02T00:00:00+00:00", "rule": "r"}, sort_keys=True
        ).encode()
    )
    path.write_bytes(
        b"\n".join([json.dumps(r, sort_keys=True).encode() for r in old] + [glued]) + b"\n"
    )
    log = AuditLog(path)
    assert [r["event"] for r in log.read()] == ["update-sent", "update-sent", "refused"]
    log.record("daemon-started")
    records = log.read()
    assert records[-1]["seq"] == 1 and records[-1]["prev"] == line_hash(lines(log)[1])
    v = log.verify()
    assert v.intact and (v.legacy, v.chained) == (2, 1)
    assert [(t.line, t.salvaged) for t in v.torn] == [(3, True)]


def test_concurrent_writers_never_fork_the_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"

    def write(name: str) -> None:
        log = AuditLog(path)  # each its own object, as the worker and a CLI command
        for i in range(40):
            log.record("tick", writer=name, i=i)

    threads = [threading.Thread(target=write, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    v = AuditLog(path).verify()
    assert v.intact and v.records == 80 and v.head_seq == 80 and not v.torn


def _site(tmp_path: Path) -> Path:
    config = tmp_path / "site.toml"
    config.write_text(SITE_TOML)
    return config


def test_site_audit_verify_exits_0_when_intact_and_1_when_broken(tmp_path: Path) -> None:
    from medfed.cli import site_cmd

    config = _site(tmp_path)
    log = log_with(tmp_path, 3)
    with open(log.path, "ab") as fh:
        fh.write(b'{"event": "upd')
    out = CliRunner().invoke(site_cmd.app, ["audit", "--config", str(config), "--verify"])
    assert out.exit_code == 0, out.output
    assert "chain intact" in out.output and "torn last line" in out.output
    assert "3 records (3 chained, 0 unchained legacy" in out.output

    raw = lines(log)
    del raw[1]  # a record removed
    log.path.write_bytes(b"\n".join(raw) + b"\n")
    out = CliRunner().invoke(site_cmd.app, ["audit", "--config", str(config), "--verify"])
    assert out.exit_code == 1, out.output
    assert "broken:" in out.output and "line 2" in out.output and "chain broken" in out.output
    out = CliRunner().invoke(site_cmd.app, ["audit", "--config", str(config), "--verify", "--json"])
    assert out.exit_code == 1
    said = json.loads(out.output)
    assert said["intact"] is False and said["breaks"][0]["line"] == 2
