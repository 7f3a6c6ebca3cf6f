"""Fault (c): kill -9 of a site's SuperNode. The site daemon restarts it and the site
trains in the next round; the daemon itself never stops (real SuperLink and site daemons
on loopback, TLS, site authentication, secure aggregation)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from medfed.core.config import RunConfig
from medfed.local import LocalFederation
from tests.test_e2e import _children as children

pytestmark = pytest.mark.slow


def trained(folder) -> set[str]:  # noqa: ANN001 - a RunFolder
    return {m["site"] for m in folder.read_metrics() if m["phase"] == "train"}


def test_a_killed_supernode_is_restarted_and_the_site_trains_in_the_next_round(
    short_tmp: Path,
) -> None:
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="supervision")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 16})
        fed.start()
        daemon = next(p for p in fed.group.members if p.name == "site daemon site-b")
        assert daemon.proc is not None
        first, s1 = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=120), timeout=240
        )
        supernodes = children(daemon.proc.pid)
        assert len(supernodes) == 1, "the site daemon runs one SuperNode as its child"
        log = fed.site_configs["site-b"].parent / "logs" / "supernode.log"
        before = len(log.read_bytes())
        killed = time.monotonic()
        os.kill(supernodes[0], signal.SIGKILL)  # no sign-off: the server still counts it
        deadline = time.monotonic() + 90
        # "SuperNode ID" is printed once the server let the new SuperNode in
        while "SuperNode ID:" not in log.read_bytes()[before:].decode(errors="replace"):
            assert daemon.alive(), daemon.log_tail()
            assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
            time.sleep(0.5)
        back_in = time.monotonic() - killed
        assert children(daemon.proc.pid) not in ([], supernodes)
        fed.wait_online(2, timeout=60)
        second, s2 = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=120), timeout=240
        )
        assert daemon.alive()  # the same daemon throughout: never exited, never restarted
        daemon_log = daemon.log_of_this_start()
    assert s1.status == s2.status == "completed", (s1, s2)
    assert trained(first) == trained(second) == {"site-a", "site-b"}
    assert second.read_summary().protection.secure_aggregation == "default"
    assert "restarting the SuperNode of site 'site-b'" in daemon_log, daemon_log[-2000:]
    assert "killed (signal 9)" in daemon_log
    assert "not enrolled" not in daemon_log
    # the daemon signed off the dead SuperNode: the new one was let in at once, not after
    # the server's heartbeat patience (a minute)
    assert back_in < 30, back_in
    audit = (short_tmp / "site-b" / "audit.jsonl").read_text()
    assert audit.count('"supernode-restarted"') == 1
