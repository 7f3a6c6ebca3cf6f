"""End to end on loopback: a real SuperLink and real site daemons, TLS and site authentication."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tomli_w

from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.errors import ProcessError
from medfed.core.identity import CertificateAuthority
from medfed.core.procs import Managed
from medfed.local import LocalFederation
from medfed.local.federation import site_daemon_argv
from medfed.server.control import Control
from medfed.server.coordinators import CoordinatorCredential
from medfed.server.follow import follow_run
from medfed.server.superlink import start_superlink

pytestmark = pytest.mark.slow


def test_two_sites_two_rounds_and_an_unenrolled_site_is_refused(short_tmp: Path) -> None:
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="e2e")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 32})
        # a third site the coordinator never enrolled
        from medfed.client.site import init_site
        from medfed.core.procs import free_port

        rogue = init_site(
            short_tmp / "rogue",
            name="rogue",
            federation_ca=fed.fed.ca_cert,
            server=fed.fed.config.superlink.address,
            runtime_port=free_port(),
        )
        fed.start()
        started = list(fed.group.members)
        # (no retries: an unknown key and a site the server still counts online look alike)
        rogue_proc = Managed(
            "rogue",
            site_daemon_argv(rogue),
            short_tmp / "rogue.log",
            env={"MEDFED_ACTIVATION_PATIENCE_S": "0"},
        ).start()
        try:
            folder, summary = fed.run(
                RunConfig(task="tiny-seg", rounds=2, min_sites=2), timeout=300
            )
            rogue_proc.proc.wait(timeout=60)
        finally:
            rogue_proc.stop()
        # A coordinator the server lets in, certified by no CA the sites pinned (as after
        # a break-in at the server): every site refuses its run before training.
        mallory = CoordinatorCredential.create(
            short_tmp / "mallory.key", "mallory", ca=CertificateAuthority.create("rogue")
        )
        fed.fed.coordinators.add("mallory", mallory.public_pem())
        with Control(fed.fed.config.superlink.address, fed.fed.ca_cert, mallory) as control:
            forged_id = control.submit(
                RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=60)
            )
            forged = follow_run(
                control, forged_id, fed.fed.runs_dir, timeout=300, on_event=lambda e: None
            )
    assert summary.status == "completed", summary
    assert sorted(summary.sites) == ["site-a", "site-b"]
    for r in (1, 2):
        ckpt = np.load(folder.checkpoint_file(r))
        assert len(ckpt.files) > 5
    rows = folder.read_metrics()
    seen = {(m["round"], m["site"], m["phase"]) for m in rows}
    for r in (1, 2):
        for site in ("site-a", "site-b", "global"):
            assert (r, site, "evaluate") in seen
        assert (r, "site-a", "train") in seen
    assert folder.plot_file.stat().st_size > 1000
    # the unenrolled site was refused and said how to fix it
    assert rogue_proc.proc.returncode == 2
    log = (short_tmp / "rogue.log").read_text()
    assert "not enrolled" in log and "medfed server enrol" in log
    # each site audited what it sent, before sending
    audit = (short_tmp / "site-a" / "audit.jsonl").read_text()
    assert audit.count('"update-sent"') == 2
    assert forged.status == "refused", forged
    assert {site: r.rule for site, r in forged.refusals.items()} == {
        "site-a": "run.signature",
        "site-b": "run.signature",
    }
    assert "not issued by the federation CA" in forged.refusals["site-a"].reason
    assert '"rule": "run.signature"' in audit
    # nothing is left running
    assert len(started) == 3
    for proc in started:
        assert not proc.alive()


def test_port_in_use_is_explained(short_tmp: Path) -> None:
    import socket

    fed = LocalFederation(short_tmp, [], name="busy").create()
    with socket.socket() as s:
        s.bind(("127.0.0.1", fed.fed.config.superlink.port))
        s.listen()
        with pytest.raises(ProcessError) as err:
            start_superlink(fed.fed)
    assert "already in use" in err.value.what and "superlink.port" in err.value.where


def test_site_with_wrong_ca_is_told_so(short_tmp: Path) -> None:
    from medfed.core.identity import CertificateAuthority

    fed = LocalFederation(short_tmp, ["site-a"], name="ca")
    with fed:
        fed.create()
        other = CertificateAuthority.create("other")
        pinned = short_tmp / "site-a" / "federation-ca.pem"
        pinned.unlink()
        other.save(pinned, short_tmp / "other.key")
        fed.start(wait_online=False)
        proc = fed.group.members[-1]
        log = short_tmp / "site-a" / "logs" / "daemon.log"
        deadline = time.time() + 60
        while "not signed by the federation CA" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        assert proc.alive()  # it says so and keeps retrying: the coordinator may fix it
    assert "not signed by the federation CA" in log.read_text()


def test_secure_aggregation_gives_the_plain_global_model(short_tmp: Path) -> None:
    fed = LocalFederation(short_tmp, ["site-a", "site-b", "site-c"], name="sa")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 32})
        fed.start()
        plain, s1 = fed.run(
            RunConfig(task="tiny-seg", rounds=2, min_sites=3, secure_aggregation="off"), timeout=300
        )
        secure, s2 = fed.run(RunConfig(task="tiny-seg", rounds=2, min_sites=3), timeout=300)
        adapted, s3 = fed.run(
            RunConfig(task="tiny-seg", rounds=2, min_sites=3, adaptation="site-input-block"),
            timeout=300,
        )
        # Warm start from the plain run's last checkpoint; a mismatched model is refused.
        warm, s4 = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=3, init_from=s1.run_id), timeout=300
        )
        _, s5 = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=3, init_from=s3.run_id), timeout=300
        )
        # The server host was broken into (the CA key was not there): its registry now
        # lists site-c's secure-aggregation certificate for site-b. No site masks.
        sites = {s["name"]: s for s in fed.fed.enrolled()}
        sites["site-b"]["secagg_certificate"] = sites["site-c"]["secagg_certificate"]
        fed.fed.sites_file.write_text(tomli_w.dumps({"site": list(sites.values())}))
        tampered, s6 = fed.run(RunConfig(task="tiny-seg", rounds=1, min_sites=3), timeout=300)
        # the server tells the sites that joined once the summary is written; they drop
        # the run's keys
        sessions = [
            short_tmp / f"site-{n}" / "secagg" / "sessions" / f"{s6.run_id}.json" for n in "abc"
        ]
        deadline = time.monotonic() + 60
        while any(f.exists() for f in sessions):
            assert time.monotonic() < deadline, [f for f in sessions if f.exists()]
            time.sleep(0.2)
    assert s4.status == "completed"
    # ... and the run ends refused at its first round, every site naming site-b's key,
    # before any site trained: a refusal, unlike a failure, repeats every round
    assert s6.status == "refused", s6
    assert s6.refusals is not None and set(s6.refusals) == {"site-a", "site-b", "site-c"}
    for refusal in s6.refusals.values():
        assert refusal.rule == "secagg.peer_key"
        assert "site 'site-b'" in refusal.reason and "without a certificate" in refusal.reason
    assert not [e for e in tampered.read_events() if e.is_("round-finished")]
    records = [json.loads(line) for line in (short_tmp / "site-a" / "audit.jsonl").open()]
    mine = [r for r in records if str(r.get("run_id")) == s6.run_id]
    assert [r["rule"] for r in mine if r["event"] == "refused"] == ["secagg.peer_key"]
    assert not [r for r in mine if r["event"] in ("privacy-reserved", "update-sent", "error")]
    started = [e for e in warm.read_events() if e["event"] == "initial-model"]
    assert started and started[0]["source"].endswith(f"{s1.run_id}/checkpoints/round-002.npz")
    assert s4.evaluate_metrics[1]["loss"] < s1.evaluate_metrics[1]["loss"]
    assert s5.status == "failed" and "different model" in s5.reason
    assert s1.status == s2.status == s3.status == "completed"
    # Site-local parameters (domain adaptation) stay at the sites, even masked.
    local = set(s3.adaptation.site_local_parameters)
    shared, every = (set(np.load(f.checkpoint_file(2)).files) for f in (adapted, plain))
    assert local and shared and not local & shared and local | shared == every
    for site in ("site-a", "site-b", "site-c"):
        kept = np.load(short_tmp / site / "site-local" / f"run-{s3.run_id}.npz")
        assert set(kept.files) == set(local)
        # The run's pairwise secrets were deleted after its last round.
        assert not list((short_tmp / site / "secagg" / "sessions").glob("*.json"))
    assert s2.protection.secure_aggregation == "default"
    bound = [e["error_bound"] for e in secure.read_events() if e["event"] == "secure-aggregation"]
    assert len(bound) == 2
    a, b = np.load(plain.checkpoint_file(1)), np.load(secure.checkpoint_file(1))
    for key in a.files:
        np.testing.assert_allclose(b[key], a[key], atol=bound[0] + 1e-6, rtol=0)
    # round 2 trains from models that differ by at most the bound: the results agree
    d1, d2 = (s.evaluate_metrics[2]["dice"] for s in (s1, s2))
    assert abs(d1 - d2) < 0.02
    # the server never received a plaintext update: every site audited a masked one
    audit = (short_tmp / "site-a" / "audit.jsonl").read_text()
    assert "tls+secure-aggregation/default" in audit
    # round 2's train messages named the model each site kept from round 1's evaluation
    for folder in (plain, secure, adapted):
        sent = [e for e in folder.read_events() if e.is_("round-sent") and e.round == 2]
        assert sent[0]["phase"] == "train" and sent[0]["models_named"] == 3
        assert not [e for e in folder.read_events() if e.is_("model-resent")]


def test_a_site_dropping_mid_run_is_recovered_by_the_survivors(short_tmp: Path) -> None:
    """DP + secure aggregation + a refusal: site-c's budget fits round 1 only (it says so
    when it joins), so it drops out of round 2; the survivors reveal that round's masks and
    the run goes on. A run every site's policy refuses ends at set-up, before anyone trains."""
    import tomli_w
    import tomllib

    fed = LocalFederation(short_tmp, ["site-a", "site-b", "site-c"], name="drop")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 32})
        for name, cfg in fed.site_configs.items():
            data = tomllib.loads(cfg.read_text())
            data["privacy"]["datasets"]["default"]["epsilon_max"] = (
                2.5 if name == "site-c" else 100.0
            )
            cfg.write_text(tomli_w.dumps(data))
        fed.start()
        # z = 2, q = 1/2, 2 steps per round: run epsilon 2.06 after round 1, 2.81 after 2
        folder, summary = fed.run(
            RunConfig(
                task="tiny-seg",
                rounds=2,
                min_sites=2,
                round_timeout_s=60,
                privacy={"mode": "sample", "noise_multiplier": 2.0, "max_grad_norm": 1.0},
            ),
            timeout=300,
        )
        # Less noise than every site's policy allows: each refuses when it joins and the
        # run ends there, cleanly, naming each site's rule (no untrained "completed" run).
        refused, refused_summary = fed.run(
            RunConfig(
                task="tiny-seg",
                rounds=3,
                min_sites=2,
                round_timeout_s=60,
                privacy={"mode": "sample", "noise_multiplier": 0.3, "max_grad_norm": 1.0},
            ),
            timeout=300,
        )
    assert refused_summary.status == "refused", refused_summary
    assert refused_summary.rounds_finished == 0
    assert {s: r.rule for s, r in refused_summary.refusals.items()} == {
        s: "privacy.datasets.default.min_noise_multiplier" for s in ("site-a", "site-b", "site-c")
    }
    assert not any(e["event"] == "round-finished" for e in refused.read_events())
    assert [e["round"] for e in refused.read_events() if e["event"] == "run-refused"] == [0]
    assert summary.status == "completed", summary
    joined = {
        e["site"]: e["metrics"]
        for e in folder.read_events()
        if e["event"] == "site-replied" and e["phase"] == "query" and e["round"] == 0
    }
    assert joined == {"site-a": {}, "site-b": {}, "site-c": {wire.BUDGET_ROUNDS_KEY: 1}}
    rounds = {e["round"]: e for e in folder.read_events() if e["event"] == "secure-aggregation"}
    assert rounds[1]["dropped"] == [] and rounds[2]["dropped"] == ["site-c"]
    assert rounds[2]["survivors"] == ["site-a", "site-b"]
    # the one-page report: epsilon per site per round, and site-c's refusal with its rule
    report = (folder.path / "report.md").read_text()
    assert "## Privacy: epsilon spent by each site" in report and "without site-c" in report
    assert "privacy.datasets.default.epsilon_max" in report
    assert "status: **refused**, 0 of 3 rounds" in (refused.path / "report.md").read_text()
    # both rounds gave a new model (round 2 from the survivors' sum)
    assert [
        e.get("model_unchanged", False)
        for e in folder.read_events()
        if e["event"] == "round-finished"
    ] == [False, False]
    refused = [e for e in folder.read_events() if e["event"] == "site-error"]
    assert any("epsilon_max" in e["reason"] for e in refused)
    audit_a = (short_tmp / "site-a" / "audit.jsonl").read_text()
    assert '"reveal-sent"' in audit_a and "server_declared_dropped" in audit_a
    final = np.load(folder.checkpoint_file(2))
    assert all(np.isfinite(final[k]).all() for k in final.files)


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (Linux /proc)."""
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def test_a_site_killed_and_restarted_at_once_is_let_back_in(short_tmp: Path) -> None:
    """kill -9 of a site daemon and its SuperNode (a power cut, the OOM killer), restarted
    at once: the SuperLink still counts the dead connection as online (up to 60 s) and
    refuses the new one as it would an unknown key; the daemon retries instead of telling
    the operator the site is not enrolled, and the site trains in the next run."""
    import os
    import signal

    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="crash")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 32})
        fed.start()
        victim = next(p for p in fed.group.members if p.name == "site daemon site-b")
        assert victim.proc is not None
        supernodes = _children(victim.proc.pid)
        assert supernodes, "the site daemon runs its SuperNode as a child"
        for pid in supernodes:  # no sign-off from the SuperNode either
            os.kill(pid, signal.SIGKILL)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(timeout=10)
        fed.group.members.remove(victim)
        with fed.control() as control:  # the server has not noticed yet
            assert {n["name"]: n["status"] for n in control.nodes()}["site-b"] == "online"
        supernode_log = fed.site_configs["site-b"].parent / "logs" / "supernode.log"
        before = len(supernode_log.read_text(errors="replace"))
        restarted = fed.start_site("site-b")
        deadline = time.monotonic() + 150
        # "SuperNode ID" is printed once the server let a SuperNode in
        while (
            "SuperNode ID:"
            not in (since := supernode_log.read_text(errors="replace")[before:]).rsplit(
                "Starting Flower SuperNode", 1
            )[-1]
        ):
            assert restarted.alive() and time.monotonic() < deadline, restarted.log_tail()
            time.sleep(1)
        assert "Failed to activate SuperNode" in since  # refused at first, then let in
        folder, summary = fed.run(
            RunConfig(task="tiny-seg", rounds=1, min_sites=2, round_timeout_s=120), timeout=300
        )
        daemon_log = restarted.log_of_this_start()
    assert "did not accept site 'site-b' yet" in daemon_log, daemon_log[-2000:]
    assert "not enrolled" not in daemon_log
    assert summary.status == "completed", summary
    assert sorted(summary.sites) == ["site-a", "site-b"]
    trained = {m["site"] for m in folder.read_metrics() if m["phase"] == "train"}
    assert trained == {"site-a", "site-b"}
