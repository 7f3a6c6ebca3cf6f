"""The dashboards without a browser: data layer on generated run folders, bind rule, token,
checkpoint paths, and the site view's silence about patients. Loopback only."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from medfed.core.config import RunConfig
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.procs import free_port
from medfed.core.run_summary import RunSummary, SiteRefusal
from medfed.core.runs import RunFolder
from medfed.core.web import Bind, Dashboard, check_bind, read_token
from medfed.server.dashboard import page
from medfed.server.dashboard.http import CoordinatorDashboard
from medfed.server.dashboard.state import OFFLINE_AFTER_S, RunFolders, sites_view
from medfed.server.federation import Federation, init_federation

SITES = ["site-a", "site-b", "site-c"]


def write_run(
    runs: Path, run_id: int, *, rounds: int, done: int, refused: bool = False
) -> RunFolder:
    """A run folder as the ServerApp writes it: ``done`` rounds of 3 sites."""
    rng = np.random.default_rng(run_id)
    folder = RunFolder.create(runs, run_id, RunConfig(task="tiny-seg", rounds=rounds))
    folder.event("run-started")
    for r in range(1, done + 1):
        folder.event("round-sent", round=r, phase="train", sites=3)
        for s in SITES:
            eps = float(0.5 * r)
            folder.metrics(r, s, "train", {"loss": float(rng.random()), "epsilon-run": eps})
            folder.event("site-replied", round=r, phase="train", site=s, metrics={})
            folder.metrics(r, s, "evaluate", {"dice": float(rng.random()), "num-examples": 8})
        folder.event("secure-aggregation", round=r, survivors=SITES[:2], dropped=SITES[2:])
        folder.save_checkpoint(r, {"w": np.full(3, r, dtype=np.float32)})
        folder.event("round-finished", round=r, seconds=1.0, checkpoint=f"round-{r:03d}.npz")
    if refused:
        folder.event(
            "site-error",
            round=done + 1,
            phase="train",
            site="site-c",
            status="refused",
            rule="privacy.datasets.default.epsilon_max",
            reason="the budget is spent",
        )
        folder.write_summary(
            RunSummary(
                status="refused",
                run_id=str(run_id),
                reason="every site refused",
                rounds=rounds,
                rounds_finished=done,
                refusals={"site-a": SiteRefusal(rule="policy.allowed_tasks", reason="no")},
            )
        )
    return folder


@pytest.fixture(scope="module")
def fed(tmp_path_factory: pytest.TempPathFactory) -> Federation:
    root = tmp_path_factory.mktemp("fed")
    fed = Federation.load(
        init_federation(root / "server", name="dash", hosts=["127.0.0.1"], port=free_port())
    )
    write_run(fed.runs_dir, 1, rounds=3, done=3)
    write_run(fed.runs_dir, 2, rounds=5, done=1, refused=True)
    return fed


def no_server() -> tuple[list, dict]:
    raise MedfedError("Cannot reach the medfed server.", fix="start it")


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as res:  # noqa: S310 - loopback
            return res.status, dict(res.headers), res.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def test_overview_shows_runs_rounds_refusals_and_secagg(fed: Federation) -> None:
    app = CoordinatorDashboard(fed, live=no_server)
    html = app("/", {}).body.decode()
    assert "3/3" in html and "1/5" in html
    assert "policy.allowed_tasks" in html and "privacy.datasets.default.epsilon_max" in html
    assert "round 3: 2 survived, dropped site-c" in html
    assert "/checkpoint/1/round-003.npz" in html
    assert "The server&#x27;s site status is unknown" in html or "site status is unknown" in html
    data = json.loads(app("/api/overview", {}).body)
    by_id = {r["run_id"]: r for r in data["runs"]}
    assert by_id["1"] == {"run_id": "1", "status": "not finished", "round": 3, "of": 3}
    assert by_id["2"]["status"] == "refused"


def test_run_details_epsilon_per_site_per_round(fed: Federation) -> None:
    app = CoordinatorDashboard(fed, live=no_server)
    details = json.loads(app("/api/run/1", {}).body)["details"]
    assert details["epsilon"]["site-b"] == [[1, 0.5], [2, 1.0], [3, 1.5]]
    assert sorted(details["metrics"]["evaluate"]["dice"]) == SITES
    assert "num-examples" not in details["metrics"]["evaluate"]
    assert details["secagg"][0] == [1, SITES[:2], SITES[2:]]
    assert app("/run/1", {}).status == 200 and app("/run/99", {}) is None


def test_run_folders_are_parsed_again_only_when_they_change(tmp_path: Path) -> None:
    folder = write_run(tmp_path, 7, rounds=4, done=2)
    runs = RunFolders(tmp_path)
    first = runs.parsed(folder)
    assert runs.parsed(folder) is first
    folder.event("round-finished", round=3, seconds=1.0, checkpoint="round-003.npz")
    assert runs.row(folder, {}).rounds_finished == 3
    # the per-site replies are never decoded for the overview
    assert not any(e.is_("site-replied") for e in runs.parsed(folder).events)


def test_the_last_checkpoint_is_the_last_round_past_round_999(tmp_path: Path) -> None:
    folder = write_run(tmp_path, 8, rounds=1000, done=1)
    for r in (999, 1000):
        folder.save_checkpoint(r, {"w": np.full(3, r, dtype=np.float32)})
    row = RunFolders(tmp_path).row(folder, {})
    assert row.checkpoints == ["round-001.npz", "round-999.npz", "round-1000.npz"]
    assert "/checkpoint/8/round-1000.npz" in page.runs_html([row])


def test_sites_online_offline_never_and_unreachable() -> None:
    enrolled = [
        {"name": n, "fingerprint": f"SHA256:{n}", "public_key": f"key-{n}", "enrolled": "2026"}
        for n in SITES
    ]
    nodes = [
        {
            "public_key": b"key-site-a",
            "status": "online",
            "online_until": 1060.0,
            "heartbeat_interval": 30.0,
        },
        {
            "public_key": b"key-site-b",
            "status": "offline",
            "last_deactivated_at": "2026-12-06T01:02:03+00:00",
        },
    ]
    view = sites_view(enrolled, lambda: nodes, now=lambda: 1010.0)
    assert [r.status for r in view.rows] == ["online", "offline", "never connected"]
    assert view.rows[0].last_seen == "1970-01-01 00:16:40"  # online_until - 2 x 30 s
    assert view.rows[1].last_seen == "2026-12-06 01:02:03"
    assert view.online == 1 and OFFLINE_AFTER_S == 60.0
    assert view.offline_after_s == 60.0  # the declared 30 s interval x Flower's patience 2
    nodes[0]["heartbeat_interval"] = 10.0  # a site.toml's heartbeat_interval_s = 10
    assert sites_view(enrolled, lambda: nodes, now=lambda: 1010.0).offline_after_s == 20.0

    def down() -> list:
        raise MedfedError("Cannot reach the medfed server.", fix="start it")

    view = sites_view(enrolled, down)
    assert {r.status for r in view.rows} == {"unknown"}
    assert "Cannot reach" in view.server_problem


def test_sites_show_the_medfed_version_each_reported_last_from_the_run_folders(
    tmp_path: Path,
) -> None:
    old = write_run(tmp_path, 1, rounds=1, done=1)
    new = write_run(tmp_path, 2, rounds=1, done=1)
    for folder, site, version, when in (
        (old, "site-a", "0.1.0", "2026-12-01T10:00:00.000+00:00"),
        (old, "site-b", "0.1.0", "2026-12-01T10:00:00.000+00:00"),
        (new, "site-a", "0.2.0", "2026-12-02T10:00:00.000+00:00"),
        (old, "site-b", "0.1.1", "2026-12-01T11:00:00.000+00:00"),  # written after run 2's
    ):
        folder.event("site-version", round=1, site=site, version=version, time=when)
    runs = RunFolders(tmp_path)
    assert runs.site_versions() == {"site-a": "0.2.0", "site-b": "0.1.1"}
    enrolled = [
        {"name": n, "fingerprint": f"SHA256:{n}", "public_key": f"key-{n}", "enrolled": "2026"}
        for n in SITES
    ]
    view = sites_view(enrolled, lambda: [], versions=runs.site_versions())
    assert [r.version for r in view.rows] == ["0.2.0", "0.1.1", ""]
    html = page.sites_html(view)
    assert "<td class=version>0.2.0</td>" in html
    assert "<td class=version><span class=dim>not reported</span></td>" in html


@pytest.mark.parametrize(
    ("bind", "missing"),
    [
        (Bind("0.0.0.0"), "without TLS"),
        (Bind("10.1.2.3", token="t" * 20), "without TLS"),
    ],
)
def test_non_loopback_without_tls_and_token_is_refused(bind: Bind, missing: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_bind(bind, where="medfed server dashboard")
    assert missing in err.value.what
    assert "--tls-cert" in err.value.fix and "127.0.0.1" in err.value.fix


def test_a_token_file_without_a_token_is_refused(tmp_path: Path) -> None:
    empty = tmp_path / "token.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ConfigError) as err:
        read_token(empty)  # never a dashboard without the login its operator asked for
    assert err.value.where == str(empty) and "secrets" in err.value.fix
    empty.write_text("a-token-of-twenty-chars\n", encoding="utf-8")
    assert read_token(empty) == "a-token-of-twenty-chars"


def test_non_loopback_with_tls_and_token_passes_and_loopback_needs_nothing(fed: Federation) -> None:
    cert, key = fed.path(fed.config.tls.cert), fed.path(fed.config.tls.key)
    check_bind(Bind("0.0.0.0", tls_cert=cert, tls_key=key, token="x" * 24), where="t")
    check_bind(Bind("127.0.0.1"), where="t")
    check_bind(Bind("::1"), where="t")
    with pytest.raises(ConfigError, match="without a login token"):
        check_bind(Bind("0.0.0.0", tls_cert=cert, tls_key=key), where="t")
    with pytest.raises(ConfigError, match="too short"):
        check_bind(Bind("127.0.0.1", token="short"), where="t")


def test_cli_refuses_a_public_bind_with_the_fix(fed: Federation) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed",
            "server",
            "dashboard",
            "--config",
            str(fed.config_path),
            "--host",
            "0.0.0.0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    text = out.stdout + out.stderr
    assert "without TLS" in text and "--token-file" in text and "Traceback" not in text


def test_token_cookie_and_read_only(fed: Federation) -> None:
    token = "correct-horse-battery-staple"
    with Dashboard(Bind(port=0, token=token), CoordinatorDashboard(fed, live=no_server)) as d:
        status, _, body = get(d.url)
        assert status == 401 and b"token" in body
        assert get(d.url + "?token=wrong-token-of-length")[0] == 401
        assert get(d.url, {"Authorization": f"Bearer {token}"})[0] == 200
        req = urllib.request.Request(d.url + f"?token={token}")
        opener = urllib.request.build_opener(NoRedirect)
        try:
            opener.open(req, timeout=10)
            raise AssertionError("expected a redirect")
        except urllib.error.HTTPError as exc:
            assert exc.code == 303
            cookie = exc.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert get(d.url, {"Cookie": cookie.split(";")[0]})[0] == 200
        # a right header with some other ?token= is served, and that token is never echoed
        echo = urllib.request.Request(
            d.url + "?token=x%0d%0aSet-Cookie:%20evil=1",
            headers={"Authorization": f"Bearer {token}"},
        )
        with opener.open(echo, timeout=10) as res:  # no redirect: the page itself
            assert res.status == 200 and "Set-Cookie" not in res.headers
        post = urllib.request.Request(d.url, data=b"x", method="POST")
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(post, timeout=10)  # noqa: S310 - loopback
        assert err.value.code == 405
        # the vendored chart library is served (no CDN)
        status, headers, js = get(d.url + "static/uPlot.iife.min.js")
        assert status == 200 and b"uPlot" in js
        assert "default-src 'self'" in headers["Content-Security-Policy"]


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: object, **kwargs: object) -> None:
        return None


@pytest.mark.parametrize(
    "path",
    [
        "checkpoint/1/..%2Frun.json",
        "checkpoint/1/run.json",
        "checkpoint/..%2F..%2Fserver.toml/round-001.npz",
        "checkpoint/1/round-001.npz/../../run.json",
        "checkpoint/%2e%2e/round-001.npz",
        "report/..",
        "static/..%2F..%2Fweb.py",
    ],
)
def test_checkpoint_download_is_restricted_to_run_folders(fed: Federation, path: str) -> None:
    with Dashboard(Bind(port=0), CoordinatorDashboard(fed, live=no_server)) as d:
        status, headers, body = get(d.url + "checkpoint/1/round-002.npz")
        assert status == 200 and "attachment" in headers["Content-Disposition"]
        import io

        assert np.load(io.BytesIO(body))["w"].tolist() == [2.0, 2.0, 2.0]
        assert get(d.url + path)[0] == 404


# ---------------------------------------------------------------- the site's view

UID = "1.2.826.0.1.3680043.8.498.12345678901234567890"
PATIENT_PATH = "/data/pacs/PAT-0042_Doe^Jane/series-7/IM0001.dcm"


@pytest.fixture
def site(tmp_path: Path) -> Path:
    from medfed.client.audit import AuditLog
    from medfed.client.site import init_site
    from medfed.core.config import SiteConfig, load_toml, resolve
    from medfed.core.identity import CertificateAuthority

    ca_file, ca_key = tmp_path / "ca.pem", tmp_path / "ca.key"
    CertificateAuthority.create("dash-ca").save(ca_file, ca_key)
    config = init_site(tmp_path / "site-a", name="site-a", federation_ca=ca_file)
    cfg = load_toml(config, SiteConfig)
    log = AuditLog(resolve(config, cfg.site.audit_log))
    log.record("cache-healed", task="tiny-seg", file=PATIENT_PATH, series=UID, reason="bad")
    log.record("error", run_id="5", op="train", reason=f"cannot read {PATIENT_PATH} ({UID})")
    log.record(
        "refused",
        run_id="5",
        rule="policy.allowed_tasks",
        reason=f"task 'x' is not allowed here; series {UID}",
        round=2,
    )
    log.record(
        "update-sent",
        run_id="5",
        round=1,
        task="tiny-seg",
        bytes=1234,
        hash="sha256:" + "ab" * 32,
        privacy={"epsilon_round": 0.25, "epsilon_run": 0.5},
    )
    (config.parent / "scan-report.json").write_text(
        json.dumps(
            {
                "files_total": 3,
                "files_used": 2,
                "files_skipped": 1,
                "skipped_by_reason": {"not DICOM": 1},
                "series": [{"series_id": UID, "modality": "MR", "label": "seg"}],
                "skipped": [{"file": PATIENT_PATH, "reason": "not DICOM", "detail": UID}],
            }
        )
    )
    return config


def test_site_view_shows_what_left_rules_budget_and_no_patient_identifier(site: Path) -> None:
    from medfed.client.site_dashboard import SiteDashboard
    from medfed.client.site_view import SiteView

    app = SiteDashboard(SiteView(site))
    html = app("/", {}).body.decode()
    state = app("/api/state", {}).body.decode()
    for text in (html, state):
        assert UID not in text and "PAT-0042" not in text and "Doe" not in text
        assert "IM0001" not in text
    assert "chain intact" in html and "policy.allowed_tasks" in html
    assert "1,234" in html and "sha256:abababab" in html
    assert "2 used" in html and "MR 1" in html
    s = json.loads(state)
    assert s["sent"][0]["epsilon_run"] == 0.5 and s["refusals"][0]["round"] == 2
    assert s["budget"]["datasets"][0]["spent"] == 0.0


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (f"cannot read {PATIENT_PATH}", "cannot read [masked]"),
        ("cannot read /Doe^Jane (bad header)", "cannot read [masked] (bad header)"),
        ("skipped PAT-0042/IM0001", "skipped [masked]"),
        (r"C:\scans\Doe^Jane", "[masked]"),
        ("IM0001.DCM is not DICOM; Doe_Jane.nii.gz empty", "[masked] is not DICOM; [masked] empty"),
        (f"series {UID} skipped", "series [masked] skipped"),
        # what a refusal must still say: its rule, counts, numbers
        (
            "round 3/10: noise 0.3 < privacy.datasets.default.min_noise_multiplier 0.5",
            "round 3/10: noise 0.3 < privacy.datasets.default.min_noise_multiplier 0.5",
        ),
    ],
)
def test_free_text_masks_paths_with_one_separator_and_file_names(text: str, shown: str) -> None:
    from medfed.client.site_view import masked

    assert masked(text) == shown


def test_site_view_reports_a_broken_chain(site: Path) -> None:
    from medfed.client.site_dashboard import SiteDashboard
    from medfed.client.site_view import SiteView

    view = SiteView(site)
    assert view.state().chain["intact"]
    log = view.audit_path
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:1] + lines[2:]))  # a record deleted
    html = SiteDashboard(view)("/", {}).body.decode()
    assert "chain broken" in html


def test_site_dashboard_is_loopback_only() -> None:
    from medfed.client.site_dashboard import site_bind

    assert site_bind("127.0.0.1", 0).host == "127.0.0.1"
    with pytest.raises(ConfigError) as err:
        site_bind("0.0.0.0", 8471)
    assert "SSH tunnel" in err.value.fix


def test_tls_with_a_token_serves_https_and_a_secure_cookie(fed: Federation) -> None:
    import ssl

    token = "x" * 24
    bind = Bind(
        "127.0.0.1",
        0,
        tls_cert=fed.path(fed.config.tls.cert),
        tls_key=fed.path(fed.config.tls.key),
        token=token,
    )
    context = ssl.create_default_context(cafile=str(fed.ca_cert))
    with Dashboard(bind, CoordinatorDashboard(fed, live=no_server)) as d:
        assert d.url.startswith("https://127.0.0.1:")
        opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context), NoRedirect
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            opener.open(d.url + f"?token={token}", timeout=10)
        assert err.value.code == 303 and "Secure" in err.value.headers["Set-Cookie"]
        req = urllib.request.Request(d.url, headers={"Authorization": f"Bearer {token}"})
        with opener.open(req, timeout=10) as res:
            assert res.status == 200 and b"Runs" in res.read()
        with pytest.raises(OSError):  # plain HTTP is not served
            urllib.request.urlopen(d.url.replace("https", "http"), timeout=10)  # noqa: S310
