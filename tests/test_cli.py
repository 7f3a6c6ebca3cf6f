"""The command line: listings, init/enrol flows, and user errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def medfed(
    *args: str, cwd: Path | None = None, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [sys.executable, "-m", "medfed", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_listings() -> None:
    out = medfed("strategies")
    assert out.returncode == 0 and "fedprox" in out.stdout and "proximal_mu" in out.stdout
    out = medfed("tasks")
    assert out.returncode == 0 and "tiny-seg" in out.stdout
    out = medfed("adaptations")
    assert out.returncode == 0 and "site-input-output" in out.stdout and "fedbn" in out.stdout


@pytest.mark.parametrize(
    ("adaptation", "message"),
    [
        ("fedbm", "did you mean 'fedbn'"),
        ("fedbn", "no normalization parameters"),  # the tissue UNet's norms are not affine
    ],
)
def test_an_adaptation_that_does_not_fit_is_refused_before_submitting(
    tmp_path: Path, adaptation: str, message: str
) -> None:
    out = medfed(
        "run",
        "--task",
        "brain-tissue-seg",
        "--adaptation",
        adaptation,
        "--server",
        "127.0.0.1:1",
        "--ca",
        "x.pem",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and message in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_unknown_task_gets_did_you_mean_without_traceback(tmp_path: Path) -> None:
    out = medfed(
        "run", "--task", "tiny-sge", "--server", "127.0.0.1:1", "--ca", "x.pem", cwd=tmp_path
    )
    assert out.returncode == 2
    assert "did you mean 'tiny-seg'" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_bad_strategy_option_is_named(tmp_path: Path) -> None:
    out = medfed(
        "run",
        "--task",
        "tiny-seg",
        "--strategy",
        "fedprox",
        "-o",
        "proximal_m=0.1",
        "--server",
        "127.0.0.1:1",
        "--ca",
        "x.pem",
        cwd=tmp_path,
    )
    assert out.returncode == 2 and "proximal_mu" in out.stderr


def test_init_enrol_and_config_error_flow(tmp_path: Path) -> None:
    out = medfed("server", "init", str(tmp_path / "fed"), "--name", "demo", "--port", "9555")
    assert out.returncode == 0, out.stderr
    server_toml = tmp_path / "fed" / "server.toml"
    assert server_toml.exists() and (tmp_path / "fed" / "ca" / "ca.pem").exists()
    out = medfed(
        "site",
        "init",
        "site-a",
        str(tmp_path / "a"),
        "--federation-ca",
        str(tmp_path / "fed" / "ca" / "ca.pem"),
        "--server",
        "127.0.0.1:9555",
    )
    assert out.returncode == 0, out.stderr
    out = medfed(
        "server",
        "enrol",
        str(tmp_path / "a" / "keys" / "site.pub"),
        "--name",
        "site-a",
        "--config",
        str(server_toml),
    )
    assert out.returncode == 0 and "enrolled" in out.stdout
    assert "site-a" in (tmp_path / "fed" / "sites.toml").read_text()
    # a typo in site.toml: the error names the file and key, no traceback
    site_toml = tmp_path / "a" / "site.toml"
    site_toml.write_text(site_toml.read_text().replace("runtime_port", "runtime_prot"))
    out = medfed("site", "start", "--config", str(site_toml))
    assert out.returncode == 2
    assert "site.runtime_prot" in out.stderr and str(site_toml) in out.stderr
    assert "Traceback" not in out.stderr


def test_wrong_ca_for_site_init(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a cert")
    out = medfed(
        "site", "init", "s", str(tmp_path / "s"), "--federation-ca", str(tmp_path / "ca.pem")
    )
    assert out.returncode == 2 and "Not a PEM certificate" in out.stderr


@pytest.mark.parametrize("args", [["status", "1"], ["runs"]])
def test_server_not_running_is_explained(tmp_path: Path, args: list[str]) -> None:
    medfed("server", "init", str(tmp_path / "fed"), "--port", "9")
    out = medfed(*args, "--config", str(tmp_path / "fed" / "server.toml"))
    assert out.returncode == 2
    assert "medfed server start" in out.stderr


def test_site_budget_lists_spend(tmp_path: Path) -> None:
    from medfed.client.ledger import PrivacyLedger
    from medfed.core.config import SiteConfig, load_toml
    from medfed.core.identity import CertificateAuthority

    ca = CertificateAuthority.create("t")
    ca.save(tmp_path / "ca.pem", tmp_path / "ca.key")
    assert (
        medfed(
            "site", "init", "s", str(tmp_path / "s"), "--federation-ca", str(tmp_path / "ca.pem")
        ).returncode
        == 0
    )
    cfg = load_toml(tmp_path / "s" / "site.toml", SiteConfig)
    name, budget = cfg.privacy.budget_for()
    ledger = PrivacyLedger(tmp_path / "s" / cfg.privacy.ledger)
    run_id = "6265552103838161844"  # Flower's run ids have up to 20 digits
    res = ledger.reserve(run_id, 1, name, budget=budget, round_history=[(1.0, 0.5, 2)], delta=1e-5)
    ledger.commit(res.record_id, steps=2)
    out = medfed(
        "site", "budget", "--config", str(tmp_path / "s" / "site.toml"), env={"COLUMNS": "80"}
    )
    assert out.returncode == 0, out.stderr
    # at 80 columns the run's row reads whole on one line: its id, unit, epsilon and date
    row = next(line for line in out.stdout.splitlines() if run_id in line).split()
    assert row[:5] == [run_id, "default", "sample", "1", f"{res.epsilon:.4f}"], row
    import re

    assert len(row) == 7 and re.fullmatch(r"\d{4}-\d\d-\d\d", row[5]), row
    assert re.fullmatch(r"\d\d:\d\d", row[6]), row
    out = medfed("site", "budget", "--config", str(tmp_path / "s" / "site.toml"), "--json")
    assert out.returncode == 0, out.stderr
    said = json.loads(out.stdout)
    assert said["datasets"]["default"]["spent"] == pytest.approx(res.epsilon)
    assert said["datasets"]["default"]["remaining"] == pytest.approx(
        budget.epsilon_max - res.epsilon
    )
    assert [(r["run_id"], r["rounds"]) for r in said["runs"]] == [(run_id, 1)]
    # a refusal in the audit log reads whole: its rule, its reason and its round
    from medfed.client.audit import AuditLog

    AuditLog(tmp_path / "s" / cfg.site.audit_log).record(
        "refused",
        run_id=78,
        round=3,
        rule="privacy.datasets.default.epsilon_max",
        reason="Privacy budget exceeded for dataset 'default': spent 9.5 + this round 1.2 > "
        "epsilon_max 10 (remaining 0.5).",
    )
    out = medfed(
        "site", "audit", "--config", str(tmp_path / "s" / "site.toml"), env={"COLUMNS": "80"}
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if " refused " in line)
    assert lines[at].split()[1:] == ["refused", "78", "round", "3"], lines[at]
    said = " ".join(line.strip() for line in lines[at + 1 : at + 4])
    assert said.startswith(
        "privacy.datasets.default.epsilon_max: Privacy budget exceeded for "
        "dataset 'default': spent 9.5 + this round 1.2 > epsilon_max 10 "
        "(remaining 0.5)."
    ), said
    assert all(len(line) <= 80 for line in lines)


def test_robust_strategy_with_secure_aggregation_is_refused(tmp_path: Path) -> None:
    out = medfed(
        "run",
        "--task",
        "tiny-seg",
        "--strategy",
        "krum",
        "--server",
        "127.0.0.1:1",
        "--ca",
        "x.pem",
        cwd=tmp_path,
    )
    assert out.returncode == 2
    assert "individual update" in out.stderr and "secure" in out.stderr


def test_a_target_epsilon_leaves_the_noise_to_each_site() -> None:
    from medfed.cli.run_cmd import privacy_options
    from medfed.core.privacy import RunPrivacy

    asked = privacy_options("sample", None, 0.3, 1.0, 1e-5, "prv", target_epsilon=8.0)
    assert RunPrivacy(**asked).noise_multiplier == 0.0  # no floor unless given
    assert RunPrivacy(**asked).target_epsilon == 8.0
    assert privacy_options("sample", None, 1.0, 1.0, 1e-5, "rdp")["noise_multiplier"] == 1.0
    floor = privacy_options("sample", 0.5, 1.0, 1.0, 1e-5, "rdp", target_epsilon=8.0)
    assert floor["noise_multiplier"] == 0.5


def test_the_privacy_unit_option_reaches_the_run_and_a_bad_one_is_refused() -> None:
    from medfed.cli.run_cmd import privacy_options
    from medfed.core.config import RunConfig, validate
    from medfed.core.errors import ConfigError
    from medfed.core.privacy import RunPrivacy

    assert RunPrivacy(**privacy_options("sample", 1.0, 1.0, 1.0, 1e-5, "rdp")).unit == "sample"
    per_scan = privacy_options("sample", 1.0, 1.0, 1.0, 1e-5, "rdp", unit="scan")
    assert RunPrivacy(**per_scan).unit == "scan"
    bad = privacy_options("sample", 1.0, 1.0, 1.0, 1e-5, "rdp", unit="study")
    with pytest.raises(ConfigError, match="unit"):
        validate(RunConfig, {"task": "tiny-seg", "privacy": bad}, where="medfed run options")


def test_runs_and_status_read_the_run_folders_while_the_server_is_down(tmp_path: Path) -> None:
    from medfed.core.config import RunConfig
    from medfed.core.runs import RunFolder

    medfed("server", "init", str(tmp_path / "fed"), "--port", "9")
    folder = RunFolder.create(
        tmp_path / "fed" / "runs", 123456789012345678, RunConfig(task="tiny-seg", rounds=2)
    )
    from medfed.core.run_summary import RunSummary

    folder.write_summary(
        RunSummary(
            status="refused", run_id="123456789012345678", rounds_finished=0, reason="no budget"
        )
    )
    RunFolder.create(tmp_path / "fed" / "runs", 77, RunConfig(task="tiny-seg"))  # unfinished
    cfg = str(tmp_path / "fed" / "server.toml")
    runs = medfed("runs", "--config", cfg)
    assert runs.returncode == 0, runs.stderr
    assert "Cannot reach the medfed server" in runs.stdout and "medfed server start" in runs.stdout
    assert "123456789012345678" in runs.stdout  # whole: `medfed status` takes it
    assert "refused" in runs.stdout and "not finished" in runs.stdout
    status = medfed("status", "123456789012345678", "--config", cfg)
    assert status.returncode == 0, status.stderr
    assert "run 123456789012345678: refused" in status.stdout
    assert "rounds finished: 0" in status.stdout
    # a run this machine holds no folder of still needs the server
    assert medfed("status", "5", "--config", cfg).returncode == 2


def test_a_bad_demo_option_is_refused_before_anything_starts(tmp_path: Path) -> None:
    out = medfed("demo", "--dp", "smaple", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert out.returncode == 2 and "privacy.mode" in out.stderr and "'sample'" in out.stderr
    assert not (tmp_path / "demo").exists()  # no federation was created or started
    out = medfed("demo", "--source", "pacs", "--out", str(tmp_path / "demo"), cwd=tmp_path)
    assert out.returncode == 2 and "--source" in out.stderr and "dicomweb" in out.stderr
    assert not (tmp_path / "demo").exists()
