"""A site reading from a real Orthanc PACS over DICOMweb (QIDO-RS, WADO-RS; STOW-RS to fill it).

Orthanc runs on 127.0.0.1 with a free port and a temporary storage folder and is
stopped after; `make test` installs it when missing.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
import torch

from medfed.cli.main import main
from medfed.core.config import DataSourceConfig, PacsQuery, PacsSection
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.identity import CertificateAuthority, save_server_identity
from medfed.data.dicomweb import STATE_FILE, PacsMirror, pacs_client
from medfed.data.pacs_push import push_folder
from medfed.data.synthetic import SyntheticGeometry, write_seg, write_series
from medfed.local.orthanc import LocalOrthanc, orthanc_missing
from medfed.synth import synthesize_sites
from medfed.tasks.imaging import load_subjects

pytestmark = pytest.mark.skipif(
    bool(orthanc_missing()), reason=f"needs Orthanc with DICOMweb: {orthanc_missing()}"
)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pacs-synth") / "synth"
    synthesize_sites(out, sites=2, subjects_per_site=3, seed=11)
    return out


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, synth: Path):
    """An Orthanc holding site-1 of the benchmark, pushed with STOW-RS."""
    folder = tmp_path_factory.mktemp("orthanc")
    with LocalOrthanc(folder / "pacs") as server:
        credentials = server.write_credentials(folder / "pacs-credentials.toml")
        push_folder(synth / "site-1" / "dicom", _pacs(server.url, credentials))
        yield server, credentials


def _pacs(url: str, credentials: Path | str = "", **query: object) -> PacsSection:
    return PacsSection(url=url, credentials=str(credentials), query=PacsQuery(**query))


def _source(pacs: PacsSection, cache: Path, manifest: Path | None = None) -> DataSourceConfig:
    return DataSourceConfig(
        kind="dicomweb",
        pacs=pacs,
        cache_dir=str(cache),
        manifest=str(manifest or ""),
        val_fraction=0.34,
    )


def _files(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.dcm"))


def _instances(server: LocalOrthanc) -> int:
    answer = requests.get(
        f"http://127.0.0.1:{server.port}/statistics",
        timeout=5,
        auth=(server.username, server.password),
    )
    return int(answer.json()["CountInstances"])


def test_site_trains_on_what_the_pacs_holds_same_as_the_folder(
    pacs, synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, credentials = pacs
    before = _instances(server)
    methods: list[str] = []
    send = requests.Session.send
    monkeypatch.setattr(
        requests.Session,
        "send",
        lambda self, req, **kw: methods.append(req.method) or send(self, req, **kw),
    )
    site = synth / "site-1"
    from_pacs = load_subjects(
        _source(
            _pacs(server.url, credentials, modality="MR"),
            tmp_path / "cache",
            site / "manifest.json",
        )
    )
    from_folder = load_subjects(
        DataSourceConfig(
            kind="dicom-folder",
            path=str(site / "dicom"),
            manifest=str(site / "manifest.json"),
            cache_dir=str(tmp_path / "folder-cache"),
        )
    )
    assert [s.key for s in from_pacs] == [s.key for s in from_folder] and len(from_pacs) == 3
    for a, b in zip(from_pacs, from_folder, strict=True):
        assert torch.equal(a.image.as_tensor(), b.image.as_tensor())
        assert torch.equal(a.label.as_tensor(), b.label.as_tensor())
        assert torch.equal(a.image.affine, b.image.affine)
        assert a.targets == b.targets and a.patient == b.patient
    assert set(methods) == {"GET"} and _instances(server) == before  # nothing written


def test_scan_fetches_once_then_only_what_is_new(
    pacs, synth: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server, credentials = pacs
    config = tmp_path / "site.toml"
    config.write_text(
        f'[site]\nname = "a"\n[data]\nkind = "dicomweb"\n'
        f'[data.pacs]\nurl = "{server.url}"\ncredentials = "{credentials}"\n'
        f'[data.pacs.query]\nmodality = "MR"\n'
    )
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            main(["site", "scan", "--config", str(config)])
        assert done.value.code == 0
    first, second = capsys.readouterr().out.split("report (counts only")[:2]
    n = _files(synth / "site-1" / "dicom")
    assert f"the query matched 3 series ({n} instances)" in first
    assert f"fetched 3 series ({n} instances" in first
    assert "fetched 0 series (0 instances" in second and "3 already in the cache" in second
    report = json.loads((tmp_path / "scan-report.json").read_text())
    assert report["pacs"]["cached_series"] == 3 and len(report["series"]) == 3
    assert "SYN" not in json.dumps(report) and "SYN" not in first + second
    # a series added to the PACS: the next sync fetches it alone
    push_folder(synth / "site-2" / "dicom" / "SYN-site2-001", _pacs(server.url, credentials))
    try:
        mirror = PacsMirror(
            _source(_pacs(server.url, credentials, modality="MR"), tmp_path / "cache")
        )
        fetch = mirror.sync()
        assert (fetch.matched_series, fetch.fetched_series, fetch.cached_series) == (4, 1, 3)
        # a narrower query: the series it no longer matches leave the cache
        narrow = PacsMirror(
            _source(
                _pacs(server.url, credentials, modality="MR", series_description="*t1w-2*"),
                tmp_path / "cache",
            )
        )
        fetch = narrow.sync()
        assert fetch.matched_series == 1 and fetch.removed_series == 3
        assert len(list(narrow.folder.glob("s-*"))) == 1
        # a query that matches nothing (mistyped; a PACS that lost its index) empties
        # nothing: refused, the cached series kept
        none = PacsMirror(
            _source(_pacs(server.url, credentials, modality="XA"), tmp_path / "cache")
        )
        with pytest.raises(MedfedError, match="matched no series at the PACS") as err:
            none.sync()
        assert "delete" in err.value.fix and "[data.pacs.query]" in err.value.where
        assert len(list(none.folder.glob("s-*"))) == 1
    finally:
        _delete_series(server, synth / "site-2" / "dicom" / "SYN-site2-001")


def _delete_series(server: LocalOrthanc, folder: Path) -> None:
    uid = pydicom.dcmread(next(folder.glob("*.dcm")), stop_before_pixels=True).SeriesInstanceUID
    base, auth = f"http://127.0.0.1:{server.port}", (server.username, server.password)
    found = requests.post(f"{base}/tools/lookup", data=uid, auth=auth, timeout=5).json()
    for item in found:
        requests.delete(f"{base}{item['Path']}", auth=auth, timeout=5).raise_for_status()


def test_a_pacs_lost_mid_fetch_leaves_the_cache_whole_and_the_next_scan_resumes(
    pacs, synth: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import medfed.data.dicomweb as dicomweb

    server, credentials = pacs
    source = _source(_pacs(server.url, credentials, modality="MR"), tmp_path / "cache")
    mirror = PacsMirror(source)
    real = dicomweb._retrieve

    def cut_after_20(client: object, url: str):  # the connection drops mid-series
        for n, part in enumerate(real(client, url)):
            if n == 20:
                raise requests.exceptions.ConnectionError("connection reset")
            yield part

    monkeypatch.setattr(dicomweb, "_retrieve", cut_after_20)
    with pytest.raises(MedfedError, match="cannot reach the PACS while fetching series 1"):
        mirror.sync()
    monkeypatch.setattr(dicomweb, "_retrieve", real)
    assert not list(mirror.folder.glob("s-*")) and not mirror.synced()
    assert len(list(mirror.staging.glob("s-*/*.dcm"))) == 20
    fetch = mirror.sync()
    n = fetch.matched_instances
    assert fetch.fetched_series == 3 and fetch.fetched_instances == n - 20
    assert mirror.synced() and (mirror.folder / STATE_FILE).is_file()
    assert sum(1 for _ in mirror.folder.glob("s-*/*.dcm")) == n


def test_labels_from_a_seg_in_the_same_study(pacs, tmp_path: Path) -> None:
    server, credentials = pacs
    rng = np.random.default_rng(9)
    stored = rng.integers(0, 1000, size=(8, 6, 5), dtype=np.int16)
    labels = np.zeros(stored.shape, np.int16)
    labels[2:6, 1:4, 1:4] = 1
    uid = pydicom.uid.generate_uid()
    files = write_series(
        tmp_path / "ct" / "img", stored, geometry=SyntheticGeometry(), series_uid=uid
    )
    seg = write_seg(
        tmp_path / "ct" / "seg.dcm", labels, geometry=SyntheticGeometry(), series_uid=uid
    )
    ds = pydicom.dcmread(seg)
    ds.StudyInstanceUID = pydicom.dcmread(files[0]).StudyInstanceUID
    ds.save_as(seg)
    push_folder(tmp_path / "ct", _pacs(server.url, credentials))
    try:
        subjects = load_subjects(
            _source(_pacs(server.url, credentials, modality="CT"), tmp_path / "cache")
        )
        assert len(subjects) == 1
        assert torch.equal(subjects[0].label.as_tensor()[0], torch.from_numpy(labels))
        assert torch.equal(subjects[0].image.as_tensor()[0], torch.from_numpy(stored).float())
    finally:
        _delete_series(server, tmp_path / "ct" / "img")
        _delete_series(server, tmp_path / "ct")


def test_what_goes_wrong_with_a_pacs_is_named(pacs, tmp_path: Path) -> None:
    server, credentials = pacs
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('username = "medfed"\npassword = "not-it"\n')
    wrong.chmod(0o600)
    with pytest.raises(MedfedError, match=r"refused the credentials \(HTTP 401\)"):
        PacsMirror(_source(_pacs(server.url, wrong), tmp_path / "c1")).sync()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(MedfedError, match="cannot reach the PACS") as err:
        PacsMirror(
            _source(_pacs(f"http://127.0.0.1:{closed}/dicom-web", credentials), tmp_path / "c2")
        ).sync()
    assert str(closed) in err.value.where
    nothing = _source(_pacs(server.url, credentials, modality="XA"), tmp_path / "c3")
    assert "the query matched nothing" in "\n".join(PacsMirror(nothing).sync().render_lines())
    with pytest.raises(MedfedError, match="query matched no series"):
        load_subjects(nothing)
    wrong.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by other users"):
        pacs_client(_pacs(server.url, wrong))
    with pytest.raises(ConfigError, match="carries credentials"):
        pacs_client(_pacs("https://u:p@pacs.example/dicom-web"))
    with pytest.raises(ConfigError, match="in clear over http"):
        pacs_client(_pacs("http://pacs.example/dicom-web", credentials))


def test_tls_needs_the_pacs_ca(
    tmp_path: Path, synth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalOrthanc(tmp_path / "pacs", tls=True) as server:
        monkeypatch.setenv("MEDFED_PACS_USERNAME", server.username)
        monkeypatch.setenv("MEDFED_PACS_PASSWORD", server.password)
        assert server.url.startswith("https://127.0.0.1:")
        untrusted = _source(_pacs(server.url), tmp_path / "c1")
        with pytest.raises(MedfedError, match="TLS with the PACS failed") as err:
            PacsMirror(untrusted).sync()
        assert "ca_bundle" in err.value.fix
        trusted = _pacs(server.url).model_copy(update={"ca_bundle": str(server.ca_pem)})
        push_folder(synth / "site-2" / "dicom" / "SYN-site2-002", trusted)
        fetch = PacsMirror(_source(trusted, tmp_path / "c2")).sync()
        assert fetch.fetched_series == 1 and fetch.fetched_instances > 0


def test_mutual_tls_needs_the_sites_client_certificate(
    tmp_path: Path, synth: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LocalOrthanc(tmp_path / "pacs", tls=True, mutual_tls=True) as server:
        monkeypatch.setenv("MEDFED_PACS_USERNAME", server.username)
        monkeypatch.setenv("MEDFED_PACS_PASSWORD", server.password)
        assert server.client_cert_pem is not None and server.client_key_pem is not None
        trusted = _pacs(server.url).model_copy(update={"ca_bundle": str(server.ca_pem)})
        with pytest.raises(MedfedError, match="client certificate") as err:
            PacsMirror(_source(trusted, tmp_path / "c1")).sync()
        assert "client_cert" in err.value.fix
        stranger_key, stranger_cert = CertificateAuthority.create("elsewhere").issue_client_cert(
            "a site of another hospital"
        )
        stranger = (tmp_path / "stranger.pem", tmp_path / "stranger.key")
        save_server_identity(stranger_key, stranger_cert, *stranger)
        with pytest.raises(MedfedError, match="refused the site's client certificate"):
            PacsMirror(
                _source(
                    trusted.model_copy(
                        update={"client_cert": str(stranger[0]), "client_key": str(stranger[1])}
                    ),
                    tmp_path / "c1",
                )
            ).sync()
        site = trusted.model_copy(
            update={
                "client_cert": str(server.client_cert_pem),
                "client_key": str(server.client_key_pem),
            }
        )
        push_folder(synth / "site-2" / "dicom" / "SYN-site2-002", site)
        fetch = PacsMirror(_source(site, tmp_path / "c2")).sync()
        assert fetch.fetched_series == 1 and fetch.fetched_instances > 0


def test_data_push_command_stores_a_site(
    tmp_path: Path, synth: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with LocalOrthanc(tmp_path / "pacs") as server:
        credentials = server.write_credentials(tmp_path / "cred.toml")
        with pytest.raises(SystemExit) as done:
            main(
                [
                    "data",
                    "push",
                    str(synth / "site-2"),
                    "--to",
                    server.url,
                    "--credentials",
                    str(credentials),
                ]
            )
        out = capsys.readouterr().out
        assert done.value.code == 0, out
        n = _files(synth / "site-2" / "dicom")
        labels = len(list((synth / "site-2").glob("labels/*.nii.gz"))) + 1  # + manifest.json
        assert f"stored {n} DICOM files" in out and f"{labels} other files left out" in out
        assert _instances(server) == n and os.stat(credentials).st_mode & 0o077 == 0


@pytest.mark.slow
def test_demo_sites_each_read_their_own_orthanc(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = tmp_path / "demo"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "medfed",
            "demo",
            "--source",
            "dicomweb",
            "--sites",
            "2",
            "--rounds",
            "1",
            "--out",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert out.stdout.count("Orthanc at https://127.0.0.1:") == 2
    for i in (1, 2):
        site = root / f"site-{i}"
        assert 'kind = "dicomweb"' in (site / "site.toml").read_text()
        sync = json.loads((site / "cache" / "pacs" / STATE_FILE).read_text())
        pushed = _files(root / "data" / f"site-{i}" / "dicom")
        assert sync["fetched_instances"] == sync["matched_instances"] == pushed > 0
    alive = subprocess.run(["pgrep", "-f", str(root / "pacs")], capture_output=True)
    assert alive.returncode == 1  # every Orthanc the demo started is stopped


class TokenGateway:
    """A bearer-token gateway in front of the Orthanc (as hospitals front a PACS with one).

    Serves 127.0.0.1 on a free port; a request without ``Authorization: Bearer <token>``
    gets 401, any other is forwarded to Orthanc with its own credentials.
    """

    def __init__(self, server: LocalOrthanc, token: str) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.seen: list[str] = []
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                gateway.seen.append(self.headers.get("Authorization", ""))
                if self.headers.get("Authorization") != f"Bearer {token}":
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", "Bearer")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                answer = requests.request(
                    self.command,
                    f"http://127.0.0.1:{server.port}{self.path}",
                    data=body or None,
                    headers={
                        k: v
                        for k, v in self.headers.items()
                        if k.lower() in ("accept", "content-type")
                    },
                    auth=(server.username, server.password),
                    timeout=30,
                )
                self.send_response(answer.status_code)
                self.send_header("Content-Type", answer.headers.get("Content-Type", ""))
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = _forward

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"

    def __enter__(self) -> TokenGateway:
        import threading

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_a_pacs_behind_a_token_gateway_is_read_with_the_token_and_a_wrong_one_is_named(
    pacs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, _ = pacs
    good = tmp_path / "token.toml"
    good.write_text('token = "s3cret-token"\n')
    good.chmod(0o600)
    with TokenGateway(server, "s3cret-token") as gateway:
        PacsMirror(_source(_pacs(gateway.url, good), tmp_path / "c1")).sync()
        assert _files(tmp_path / "c1") == _instances(server) > 0
        assert gateway.seen and set(gateway.seen) == {"Bearer s3cret-token"}

        monkeypatch.setenv("MEDFED_PACS_TOKEN", "s3cret-token")  # or from the environment
        PacsMirror(_source(_pacs(gateway.url), tmp_path / "c2")).sync()
        assert _files(tmp_path / "c2") == _instances(server)

        monkeypatch.setenv("MEDFED_PACS_TOKEN", "expired-token")
        with pytest.raises(MedfedError, match=r"refused the credentials \(HTTP 401\)"):
            PacsMirror(_source(_pacs(gateway.url), tmp_path / "c3")).sync()
        assert _files(tmp_path / "c3") == 0
    with pytest.raises(ConfigError, match="in clear over http"):
        pacs_client(_pacs("http://pacs.example/dicom-web", good))
