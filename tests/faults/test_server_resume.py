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
from medfed.core.runs import RunFolder, find_run
from medfed.local import LocalFederation
from medfed.server.follow import follow_run
from medfed.server.superlink import start_superlink
from medfed.tasks.dp import epsilon_of_history

pytestmark = pytest.mark.slow

Events = list[dict[str, Any]]


def _crash_and_resume(fed: LocalFederation, config: RunConfig,
                      crash_when: Callable[[Events], bool]) -> tuple[RunFolder, dict[str, Any]]:
    """Submit ``config``; kill -9 the SuperLink (and its ServerApp) once ``crash_when``
    holds of the run's events; start the server again; follow the run to its end."""
    with fed.control() as control:
        run_id = control.submit(config)
    runs_dir = fed.fed.runs_dir
    folder = RunFolder(runs_dir / str(run_id))
    deadline = time.monotonic() + 240
    while not crash_when(folder.read_events()):
        assert time.monotonic() < deadline, "the run did not reach the point of the crash"
        time.sleep(0.05)
    superlink = fed.group.members[0]
    os.killpg(superlink.proc.pid, signal.SIGKILL)
    superlink.proc.wait(timeout=10)
    assert folder.read_summary() is None
    fed.group.members[0] = start_superlink(fed.fed)
    with fed.control() as control:
        summary = follow_run(control, run_id, runs_dir, on_event=lambda e: None, timeout=300)
    return folder, summary


def _in_round_2(events: Events) -> bool:
    return any(e["event"] == "round-sent" and e["round"] == 2 and e["phase"] == "train"
               for e in events)


def _after_round_2_replies(events: Events) -> bool:
    return sum(e["event"] == "site-replied" and e["round"] == 2 and e["phase"] == "train"
               for e in events) == 2


def _final(folder: RunFolder, rounds: int) -> dict[str, np.ndarray]:
    with np.load(folder.checkpoint_file(rounds)) as ckpt:
        return {k: ckpt[k] for k in ckpt.files}


def _resumed_once_at_round_2(folder: RunFolder, summary: dict[str, Any]) -> Events:
    assert summary["status"] == "completed", summary
    events = folder.read_events()
    resumed = [e for e in events if e["event"] == "run-resumed"]
    assert [e["round"] for e in resumed] == [2], resumed  # only round 2 is redone
    assert [e["round"] for e in events if e["event"] == "round-finished"] == [1, 2, 3, 4]
    # the server's later run id names the same run
    assert find_run(folder.path.parent, resumed[0]["flower_run_id"]).path == folder.path
    assert summary["resumed"][0]["round"] == 2
    return events


def test_server_killed_in_round_2_of_4_resumes_and_matches_an_uninterrupted_run(
        short_tmp: Path) -> None:
    config = RunConfig(task="tiny-seg", rounds=4, min_sites=2, seed=7, round_timeout_s=120)
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="resume")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 24})
        fed.start()
        plain, plain_summary = fed.run(config, timeout=300)
        assert plain_summary["status"] == "completed", plain_summary
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
    config = RunConfig(task="tiny-seg", rounds=4, min_sites=2, seed=3, round_timeout_s=120,
                       privacy={"mode": "sample", "noise_multiplier": 1.0})
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="resume-dp")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 24})
        fed.set_budget(epsilon_max=1000.0)
        fed.start()
        # both sites trained, masked and sent round 2; the server dies before aggregating
        folder, summary = _crash_and_resume(fed, config, _after_round_2_replies)

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
