"""Faults (e) to (h) at a site, in a real federation on 127.0.0.1 (TLS, secure aggregation).

(f) a truncated cache entry is decoded again and the run goes on, at a site whose DICOM
folder also holds every file pydicom ships, odd and damaged ones (tests/dicom_zoo.py),
which never stop it; (g) a torn last line
of the audit log is reported by `medfed site audit --verify` and the records after it
stay whole; (e) a deleted privacy ledger refuses DP until `medfed site budget
--rebuild-from-audit` restores what was spent; (h) of two DP runs that do not both fit
one budget, the first finishes and the second is refused when it joins.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import tomllib
from dicom_zoo import build_zoo

from medfed.client.audit import AuditLog
from medfed.client.ledger import PrivacyLedger
from medfed.client.secure_site import load_identity
from medfed.core.config import RunConfig
from medfed.core.privacy_accounting import epsilon_of_history
from medfed.core.runs import RunFolder
from medfed.core.secagg import fingerprint
from medfed.local import LocalFederation
from medfed.server.follow import follow_run

pytestmark = pytest.mark.slow

DP = {"mode": "sample", "noise_multiplier": 2.0, "max_grad_norm": 1.0}


def _site_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "medfed", "site", *args], capture_output=True, text=True, timeout=120
    )


def test_a_damaged_cache_entry_and_a_torn_audit_line_do_not_stop_a_site(short_tmp: Path) -> None:
    from medfed.synth import synthesize_sites

    synthesize_sites(short_tmp / "data", sites=2, subjects_per_site=3, seed=5)
    build_zoo(short_tmp / "data" / "site-1" / "dicom" / "zoo")
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="records")
    with fed:
        fed.create(
            site_data=lambda i, name: {
                "kind": "dicom-folder",
                "path": str(short_tmp / "data" / f"site-{i + 1}" / "dicom"),
                "manifest": str(short_tmp / "data" / f"site-{i + 1}" / "manifest.json"),
                "val_fraction": 0.34,
            }
        )
        fed.start()
        config = RunConfig(
            task="brain-tissue-seg", rounds=1, min_sites=2, local_epochs=1, round_timeout_s=300
        )
        _, first = fed.run(config, timeout=600)
        assert first.status == "completed", first
        site_a = short_tmp / "site-a"
        (loaded,) = [
            r for r in AuditLog(site_a / "audit.jsonl").read() if r["event"] == "data-loaded"
        ]
        # trained on its 3 labelled series; the zoo's series that decode are counted
        assert loaded["data"]["subjects-train"] + loaded["data"]["subjects-val"] == 3, loaded
        assert loaded["data"]["unlabelled"] > 20, loaded
        # the daemon says which secure-aggregation key it holds: the one enrolment certified
        (started, *_) = [
            r for r in AuditLog(site_a / "audit.jsonl").read() if r["event"] == "daemon-started"
        ]
        assert started["secagg_identity"] == fingerprint(load_identity(site_a).public_bytes)
        daemon = next(p for p in fed.group.members if p.name == "site daemon site-a")
        daemon.stop()  # the warm worker keeps decoded data: a restart reads the cache again
        entries = sorted((site_a / "cache").glob("series-*.npz"))
        assert entries
        entries[0].write_bytes(entries[0].read_bytes()[:200])  # (f) truncated
        with open(site_a / "audit.jsonl", "ab") as fh:  # (g) a crash mid-write
            fh.write(b'{"event": "update-sent", "round": 9, "by')
        fed.group.members.remove(daemon)
        fed.start_site("site-a")
        fed.wait_online(2)
        _, second = fed.run(config, timeout=600)
    assert second.status == "completed", second
    records = AuditLog(site_a / "audit.jsonl").read()
    assert any(r["event"] == "cache-healed" for r in records)
    assert any(r["event"] == "audit-torn-line" for r in records)
    assert any(r["event"] == "update-sent" for r in records[-6:])  # later records whole
    verified = _site_cli("audit", "--verify", "--config", str(site_a / "site.toml"))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "torn" in verified.stdout and "Traceback" not in verified.stderr


def _tight_budget(fed: LocalFederation, epsilon_max: float) -> None:
    """A second dataset, "tight", at every site (before the sites start)."""
    for cfg in fed.site_configs.values():
        data = tomllib.loads(cfg.read_text(encoding="utf-8"))
        data["privacy"]["datasets"]["tight"] = {
            **data["privacy"]["datasets"]["default"],
            "epsilon_max": epsilon_max,
        }
        cfg.write_text(tomli_w.dumps(data), encoding="utf-8")


def test_a_deleted_ledger_is_rebuilt_and_concurrent_runs_are_admitted_only_while_they_fit(
    short_tmp: Path,
) -> None:
    # tiny-seg at 32 samples: q = 1/2, 2 steps per round; z = 2 (see test_e2e)
    def eps(rounds: int) -> float:
        return epsilon_of_history([(2.0, 0.5, 2)] * rounds, 1e-5, "rdp")

    # Run A (6 rounds) fits; B's first round fits beside what A has SPENT until its
    # third round, but not beside what A has joined for (its hold).
    tight = eps(6) + eps(1) - 0.1
    assert eps(3) + eps(1) < tight < eps(6) + eps(1)
    fed = LocalFederation(short_tmp, ["site-a", "site-b"], name="ledger")
    with fed:
        fed.create(site_data=lambda i, name: {"num_samples": 32})
        fed.set_budget(epsilon_max=100.0)
        _tight_budget(fed, tight)
        fed.start()
        dp_run = RunConfig(task="tiny-seg", rounds=2, min_sites=2, round_timeout_s=60, privacy=DP)
        _, done = fed.run(dp_run, timeout=300)
        assert done.status == "completed", done
        ledger_b = short_tmp / "site-b" / "privacy" / "ledger.sqlite"
        spent = PrivacyLedger(ledger_b, create=False).spent("default")
        assert spent == pytest.approx(eps(2), rel=1e-6)

        ledger_b.unlink()  # (e) while the daemon runs
        refused_folder, refused = fed.run(dp_run, timeout=300)
        assert refused.status == "refused", refused
        assert refused.refusals["site-b"].rule == "privacy.ledger"
        assert "--rebuild-from-audit" in refused.refusals["site-b"].reason
        # site-a had joined it: told that the run ended (just after its summary), it
        # holds nothing for it
        ledger_a = PrivacyLedger(short_tmp / "site-a" / "privacy" / "ledger.sqlite", create=False)
        deadline = time.monotonic() + 20
        while any(h.run_id == refused_folder.path.name for h in ledger_a.holds()):
            assert time.monotonic() < deadline, ledger_a.holds()
            time.sleep(0.2)
        rebuilt = _site_cli(
            "budget", "--rebuild-from-audit", "--config", str(short_tmp / "site-b" / "site.toml")
        )
        assert rebuilt.returncode == 0, rebuilt.stdout + rebuilt.stderr
        assert PrivacyLedger(ledger_b, create=False).spent("default") == pytest.approx(
            spent, rel=1e-9
        )

        # (h) two DP runs on the tight budget
        with fed.control() as control:
            first = control.submit(
                RunConfig(
                    task="tiny-seg",
                    rounds=6,
                    min_sites=2,
                    round_timeout_s=60,
                    privacy=DP,
                    dataset="tight",
                )
            )
            folder = RunFolder(fed.fed.runs_dir / str(first))
            deadline = time.monotonic() + 120
            while not any(e["event"] == "secure-aggregation-ready" for e in folder.read_events()):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            second = control.submit(
                RunConfig(
                    task="tiny-seg",
                    rounds=1,
                    min_sites=2,
                    round_timeout_s=60,
                    privacy=DP,
                    dataset="tight",
                )
            )
            later = follow_run(
                control, second, fed.fed.runs_dir, on_event=lambda e: None, timeout=300
            )
            earlier = follow_run(
                control, first, fed.fed.runs_dir, on_event=lambda e: None, timeout=300
            )
    assert earlier.status == "completed", earlier
    assert later.status == "refused" and later.rounds_finished == 0, later
    for site, why in later.refusals.items():
        assert why.rule == "privacy.datasets.tight.epsilon_max", (site, why)
        # Refused for what the first run holds (joined, not yet spent); on a machine so
        # loaded that the second run's ServerApp starts only after the first has spent
        # all 6 rounds, refused for that spend: either way it never trains.
        assert f"run '{first}' holds" in why.reason or f"spent {eps(6):.4g} +" in why.reason, why
    for site in ("site-a", "site-b"):
        ledger = PrivacyLedger(short_tmp / site / "privacy" / "ledger.sqlite", create=False)
        assert ledger.spent("tight") == pytest.approx(eps(6), rel=1e-6)
