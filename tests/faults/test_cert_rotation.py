"""Fault (d): the server's TLS certificate expires, then is renewed, while the sites run.

Each site says once what happened and who must act (the coordinator), keeps running, and
reconnects by itself once `medfed server renew-cert` ran: no site is restarted (real
SuperLink and site daemons on loopback, TLS, site authentication, secure aggregation).
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.core.config import RunConfig
from medfed.core.identity import CertificateAuthority, replace_server_identity
from medfed.core.procs import wait_for_port
from medfed.local import LocalFederation
from medfed.server.superlink import superlink_process

pytestmark = pytest.mark.slow

EXPIRED = "presents an expired TLS certificate"


def test_sites_ride_out_an_expired_server_certificate_and_its_renewal(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MEDFED_RESTART_MAX_S", "4")  # retry often: the test waits on it
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="renewal")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 16})
        fed.start()
        daemons = [p for p in fed.group.members if p.name.startswith("site daemon")]
        tls, link = fed.fed.config.tls, fed.fed.config.superlink
        # The certificate expires; the server is restarted with it (a reboot, say).
        fed.group.members[0].stop()
        ca = CertificateAuthority.load(fed.fed.ca_cert, fed.fed.path(tls.ca_key))
        key, cert = ca.issue_server_cert(
            ["127.0.0.1", "localhost"],
            days=1,
            not_before=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=3),
        )
        replace_server_identity(key, cert, fed.fed.path(tls.cert), fed.fed.path(tls.key))
        superlink = superlink_process(fed.fed).start()  # `medfed server start` would refuse
        fed.group.members[0] = superlink
        assert wait_for_port(link.host, link.port, timeout=60, alive=superlink.alive)
        deadline = time.monotonic() + 120
        while not all(EXPIRED in d.log_of_this_start() for d in daemons):
            for d in daemons:
                assert d.alive(), d.log_tail()
            assert time.monotonic() < deadline, [d.log_tail() for d in daemons]
            time.sleep(0.5)
        # The coordinator renews it; the running server serves it at once.
        renew = subprocess.run(
            [
                sys.executable,
                "-m",
                "medfed",
                "server",
                "renew-cert",
                "--config",
                str(fed.fed.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert renew.returncode == 0, renew.stderr
        assert "a running server uses it" in renew.stdout
        fed.wait_online(2, timeout=120)
        folder, summary = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=120), timeout=240
        )
        for d in daemons:  # the same daemons throughout
            assert d.alive()
        logs = [d.log_of_this_start() for d in daemons]
    assert summary.status == "completed", summary
    assert {m["site"] for m in folder.read_metrics() if m["phase"] == "train"} == {
        "site-a",
        "site-b",
    }
    assert summary.protection.secure_aggregation == "default"
    for log in logs:
        assert log.count(EXPIRED) == 1, log[-3000:]  # said once, however many retries
        assert "medfed server renew-cert" in log and "Nothing to change at this site" in log
        assert "connected to the server at" in log and "again" in log
        assert "Traceback" not in log


def medfed_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed", *args], capture_output=True, text=True, timeout=120
    )


def restart_server(fed: LocalFederation) -> None:
    """Stop the SuperLink and start it again (`systemctl restart medfed-server`)."""
    from medfed.server.superlink import start_superlink

    fed.group.members[0].stop()
    fed.group.members[0] = start_superlink(fed.fed)


def test_a_ca_rotation_with_an_overlap_needs_no_site_restart(short_tmp: Path) -> None:
    """site-a pins the bundle of both CAs before the switch; site-b only after it."""
    import shutil

    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="rotation")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 16})
        fed.start()
        daemons = {
            p.name[len("site daemon ") :]: p
            for p in fed.group.members
            if p.name.startswith("site daemon")
        }
        config = str(fed.fed.config_path)
        begun = medfed_cli("server", "rotate-ca", "--config", config)
        assert begun.returncode == 0, begun.stderr
        assert "ca-bundle.pem" in begun.stdout and "restart the server once" in begun.stdout
        bundle = fed.fed.ca_cert.with_name("ca-bundle.pem")
        pinned = {s: cfg.parent / "federation-ca.pem" for s, cfg in fed.site_configs.items()}
        shutil.copyfile(bundle, pinned["site-a"])
        # the server started before the rotation: its ServerApps would not trust the new CA
        early = medfed_cli("server", "rotate-ca", "--finish", "--config", config)
        assert early.returncode == 2 and "restart the server once" in early.stderr
        restart_server(fed)
        finished = medfed_cli("server", "rotate-ca", "--finish", "--config", config)
        assert finished.returncode == 0, finished.stderr
        restart_server(fed)  # a reboot: every site dials anew, with the new certificate
        deadline = time.monotonic() + 120
        told = "not signed by the federation CA this site pins"
        while told not in daemons["site-b"].log_of_this_start():
            assert time.monotonic() < deadline, daemons["site-b"].log_tail()
            time.sleep(0.5)
        shutil.copyfile(bundle, pinned["site-b"])  # the operator drops the bundle in
        fed.wait_online(2, timeout=120)
        folder, summary = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=120), timeout=240
        )
        for d in daemons.values():
            assert d.alive()  # never restarted
        logs = {s: d.log_of_this_start() for s, d in daemons.items()}
    assert summary.status == "completed", summary
    assert {m["site"] for m in folder.read_metrics() if m["phase"] == "train"} == {
        "site-a",
        "site-b",
    }
    assert told not in logs["site-a"]
    assert logs["site-b"].count(told) == 1 and "ca/ca-bundle.pem" in logs["site-b"]
