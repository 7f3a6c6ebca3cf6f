"""Faults (a) and (b): kill -9 of the server in round 2 of 4; `medfed server start` resumes.

A real SuperLink and real site daemons on 127.0.0.1, TLS, site authentication, secure
aggregation on. (a) The resumed run completes all 4 rounds, redoes only the
interrupted round, and its final model equals an uninterrupted run of the same
configuration (same seed; deterministic CPU training) within the secure-aggregation
error bound. (b) Under DP-SGD, each site's ledger charges the run exactly the
accountant's epsilon of the 4 rounds it trained: the round the server lost after the
sites had sent it is sent again, unchanged, and not charged twice.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from medfed.client.ledger import PrivacyLedger
from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.privacy_accounting import epsilon_of_history
from medfed.core.run_summary import RunSummary
from medfed.core.runs import RunFolder, find_run
from medfed.local import LocalFederation
from medfed.server.follow import follow_run
from medfed.server.superlink import start_superlink

pytestmark = pytest.mark.slow

Events = list[dict[str, Any]]


def _run_holder(folder: RunFolder) -> int:
    """The pid of the ServerApp that holds ``folder`` (its flock, from /proc/locks)."""
    st = os.stat(folder.path / ".lock")
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and fields[5] == dev:
            return int(fields[4])
    raise AssertionError(f"no process holds {folder.path}/.lock")


def _sites_sent(fed: LocalFederation, rnd: int) -> bool:
    """Whether every site's audit log says it sent its round-``rnd`` update."""
    return all(
        any(
            r.get("event") == "update-sent" and r.get("round") == rnd
            for r in map(json.loads, (fed.root / s / "audit.jsonl").read_text().splitlines())
        )
        for s in fed.site_names
    )


def _crash_and_resume(
    fed: LocalFederation,
    config: RunConfig,
    crash_when: Callable[[Events], bool],
    *,
    after_sites_sent: int | None = None,
) -> tuple[RunFolder, RunSummary]:
    """Submit ``config``; kill -9 the SuperLink and its ServerApp once ``crash_when``
    holds of the run's events; start the server again; follow the run to its end.

    With ``after_sites_sent`` a round, the ServerApp is paused (SIGSTOP) at that point
    and killed only once every site sent that round's update: the server lost a round
    that every site had sent, whatever the timing of the machine.
    """
    with fed.control() as control:
        run_id = control.submit(config)
    runs_dir = fed.fed.runs_dir
    folder = RunFolder(runs_dir / str(run_id))
    deadline = time.monotonic() + 240
    while not crash_when(folder.read_events()):
        assert time.monotonic() < deadline, "the run did not reach the point of the crash"
        time.sleep(0.05)
    serverapp = _run_holder(folder)
    try:
        if after_sites_sent is not None:
            os.kill(serverapp, signal.SIGSTOP)
            while not _sites_sent(fed, after_sites_sent):
                assert time.monotonic() < deadline, "the sites did not send their updates"
                time.sleep(0.1)
            time.sleep(1.0)  # the SuperNodes push what the sites handed them
            assert not any(
                e["event"] == "round-finished" and e["round"] == after_sites_sent
                for e in folder.read_events()
            )
    finally:  # as a power cut: the SuperLink and its ServerApp (never left paused)
        superlink = fed.group.members[0]
        os.killpg(superlink.proc.pid, signal.SIGKILL)
        os.kill(serverapp, signal.SIGKILL)
    superlink.proc.wait(timeout=10)
    assert folder.read_summary() is None
    fed.group.members[0] = start_superlink(fed.fed)
    with fed.control() as control:
        try:
            summary = follow_run(control, run_id, runs_dir, on_event=lambda e: None, timeout=300)
        except MedfedError as exc:  # what each part did, for a failure seen only in CI
            raise AssertionError(f"{exc}\n{_state_of(fed, folder)}") from exc
    return folder, summary


def _state_of(fed: LocalFederation, folder: RunFolder) -> str:
    """The run's last events and the tails of the SuperLink's and the sites' logs."""

    def tail(path: Path, n: int) -> str:
        lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
        return "\n".join(f"  {line[:300]}" for line in lines[-n:])

    parts = [f"events of {folder.path}:", tail(folder.path / "events.jsonl", 15)]
    parts += ["SuperLink log:", tail(fed.root / "server" / "state" / "superlink.log", 60)]
    for site in fed.site_names:
        for log_file in sorted((fed.root / site / "logs").glob("*.log")):
            parts += [f"{site} {log_file.name}:", tail(log_file, 25)]
    return "\n".join(parts)


def _in_round_2(events: Events) -> bool:
    return any(
        e["event"] == "round-sent" and e["round"] == 2 and e["phase"] == "train" for e in events
    )


def _final(folder: RunFolder, rounds: int) -> dict[str, np.ndarray]:
    with np.load(folder.checkpoint_file(rounds)) as ckpt:
        return {k: ckpt[k] for k in ckpt.files}


def _resumed_once_at_round_2(folder: RunFolder, summary: RunSummary) -> Events:
    assert summary.status == "completed", summary
    events = folder.read_events()
    resumed = [e for e in events if e["event"] == "run-resumed"]
    assert [e["round"] for e in resumed] == [2], resumed  # only round 2 is redone
    assert [e["round"] for e in events if e["event"] == "round-finished"] == [1, 2, 3, 4]
    # the server's later run id names the same run
    assert find_run(folder.path.parent, resumed[0]["flower_run_id"]).path == folder.path
    assert summary.resumed[0].round == 2
    return events


def test_server_killed_in_round_2_of_4_resumes_and_matches_an_uninterrupted_run(
    short_tmp: Path,
) -> None:
    config = RunConfig(task="tiny-seg", rounds=4, min_sites=2, seed=7, round_timeout_s=120)
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="resume")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 24})
        fed.start()
        plain, plain_summary = fed.run(config, timeout=300)
        assert plain_summary.status == "completed", plain_summary
        folder, summary = _crash_and_resume(fed, config, _in_round_2)

    events = _resumed_once_at_round_2(folder, summary)
    # the same model as the uninterrupted run, within secure aggregation's error bound
    bound = sum(e["error_bound"] for e in events if e["event"] == "secure-aggregation")
    a, b = _final(plain, 4), _final(folder, 4)
    assert a.keys() == b.keys()
    worst = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k]))) for k in a)
    assert worst <= bound + 1e-6, (worst, bound)
    assert "resumed after a server restart at round 2" in folder.report_file.read_text()


def test_a_dp_round_the_server_lost_is_sent_again_and_charged_once(short_tmp: Path) -> None:
    config = RunConfig(
        task="tiny-seg",
        rounds=4,
        min_sites=2,
        seed=3,
        round_timeout_s=120,
        privacy={"mode": "sample", "noise_multiplier": 1.0},
    )
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="resume-dp")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 24})
        fed.set_budget(epsilon_max=1000.0)
        fed.start()
        # both sites trained, masked and sent round 2; the server dies before aggregating
        folder, summary = _crash_and_resume(fed, config, _in_round_2, after_sites_sent=2)

    _resumed_once_at_round_2(folder, summary)
    run_id = folder.path.name
    for site in ("site-a", "site-b"):
        ledger = PrivacyLedger(short_tmp / site / "privacy" / "ledger.sqlite", create=False)
        spends = [s for s in ledger.history("default") if s.run_id == run_id]
        assert sorted(s.round for s in spends) == [1, 2, 3, 4], spends
        assert all(s.status == "committed" for s in spends)
        assert [s.round for s in spends if s.resent] == [2]  # the ledger says which
        history = ledger.run_history(run_id, "default")
        assert len(history) == 4
        expected = epsilon_of_history(history, config.privacy.target_delta, "rdp")
        assert sum(s.epsilon for s in spends) == pytest.approx(expected, rel=1e-9)
        audit = (short_tmp / site / "audit.jsonl").read_text()
        assert audit.count('"resent": true') >= 1
