"""A real Orthanc PACS with its DICOMweb plugin on 127.0.0.1, for the demo and the tests.

Debian's ``orthanc`` and ``orthanc-dicomweb`` packages provide the server and the
plugin (`make test` installs them when missing). The server gets a free port, its
own storage folder, one user, no DICOM (C-STORE) listener and, on request, TLS
with a certificate from a throw-away CA, served by a TLS front as a hospital's
reverse proxy would (Debian's Orthanc dies on its own TLS: see
:mod:`medfed.local.tls_front`), which with ``mutual_tls`` also wants a client
certificate from that CA (one is issued for the site); it ends with the process
that started it.
"""

from __future__ import annotations

import json
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from medfed.core.errors import MedfedError, ProcessError
from medfed.core.identity import CertificateAuthority, save_server_identity, write_private
from medfed.core.procs import Managed, free_port
from medfed.local.tls_front import TlsFront

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc"))
PLUGIN = "libOrthancDicomWeb.so"
INSTALL_HINT = "apt-get install orthanc orthanc-dicomweb (or `make test`, which does it)"


def orthanc_missing() -> str:
    """Why a local Orthanc with DICOMweb cannot start here; ``""`` when it can."""
    if shutil.which("Orthanc") is None:
        return "the Orthanc binary is not installed"
    if _plugin() is None:
        return f"Orthanc's DICOMweb plugin ({PLUGIN}) is not installed"
    return ""


def _plugin() -> Path | None:
    return next((d / PLUGIN for d in PLUGIN_DIRS if (d / PLUGIN).is_file()), None)


@dataclass
class LocalOrthanc:
    """One Orthanc under ``folder`` (storage, config, log); ``with`` starts and stops it."""

    folder: Path
    tls: bool = False
    mutual_tls: bool = False
    username: str = "medfed"
    password: str = ""
    port: int = 0
    ca_pem: Path | None = None
    client_cert_pem: Path | None = None  # the site's, with mutual_tls
    client_key_pem: Path | None = None
    _proc: Managed | None = None
    _front: TlsFront | None = None
    _http_port: int = 0

    @property
    def url(self) -> str:
        """The DICOMweb root."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}/dicom-web"

    def write_credentials(self, path: Path) -> Path:
        """The user's credentials as a medfed credentials file (mode 600)."""
        write_private(
            path, f'username = "{self.username}"\npassword = "{self.password}"\n'.encode()
        )
        return path

    def start(self, timeout: float = 30.0) -> LocalOrthanc:
        """Start the server and wait until its REST API answers."""
        missing = orthanc_missing()
        if missing:
            raise MedfedError(f"cannot start a local PACS: {missing}", fix=INSTALL_HINT)
        if self.mutual_tls and not self.tls:
            raise MedfedError(
                "mutual TLS needs tls=True", where="LocalOrthanc", fix="pass tls=True as well"
            )
        self.folder.mkdir(parents=True, exist_ok=True)
        self.password = self.password or secrets.token_urlsafe(16)
        self._http_port = free_port() if self.tls else (self.port or free_port())
        config = {
            "Name": "medfed-local",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "HttpPort": self._http_port,
            "DicomServerEnabled": False,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.username: self.password},
            "Plugins": [str(_plugin())],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "HttpCompressionEnabled": False,
            "StorageCompression": False,
            "ExecuteLuaEnabled": False,
            "RestApiWriteToFileSystemEnabled": False,
        }
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        self._proc = Managed(
            "Orthanc", ["Orthanc", str(path)], self.folder / "orthanc.log", die_with_parent=True
        ).start()
        if self.tls:
            cert, key, ca = self._certificates()
            self._front = TlsFront(
                self._http_port,
                cert,
                key,
                port=self.port,
                client_ca=ca if self.mutual_tls else None,
            ).start()
        self.port = self._front.port if self._front else self._http_port
        self._wait(timeout)
        return self

    def stop(self) -> None:
        """Stop the server (its storage stays in the folder)."""
        if self._front is not None:
            self._front.stop()
            self._front = None
        if self._proc is not None:
            self._proc.stop()
            self._proc = None

    def __enter__(self) -> LocalOrthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _certificates(self) -> tuple[Path, Path, Path]:
        """A server certificate and key for 127.0.0.1 from a new CA, and the CA's PEM.

        With ``mutual_tls`` the CA also issues the site's client certificate
        (``client_cert_pem``, ``client_key_pem``).
        """
        ca = CertificateAuthority.create("local PACS")
        self.ca_pem = self.folder / "pacs-ca.pem"
        self.ca_pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
        cert_pem, key_pem = _write_pair(
            self.folder / "server", *ca.issue_server_cert(["127.0.0.1", "localhost"])
        )
        if self.mutual_tls:
            self.client_cert_pem, self.client_key_pem = _write_pair(
                self.folder / "site-client", *ca.issue_client_cert("medfed site")
            )
        return cert_pem, key_pem, self.ca_pem

    def _wait(self, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self._proc is not None
            if not self._proc.alive():
                break
            try:
                answer = requests.get(
                    f"{self.url.rsplit('/', 1)[0]}/system",
                    timeout=2,
                    auth=(self.username, self.password),
                    verify=str(self.ca_pem) if self.ca_pem else True,
                    cert=(str(self.client_cert_pem), str(self.client_key_pem))
                    if self.mutual_tls
                    else None,
                )
                if answer.status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        tail = self._proc.log_tail() if self._proc else ""
        self.stop()
        raise ProcessError(
            "the local Orthanc did not start",
            where=str(self.folder),
            fix="read its log; last lines:\n" + tail,
        )


def _write_pair(stem: Path, key: Any, cert: Any) -> tuple[Path, Path]:
    """``stem.pem`` (the certificate) and ``stem.key`` (its key, owner-only)."""
    cert_pem, key_pem = stem.with_suffix(".pem"), stem.with_suffix(".key")
    save_server_identity(key, cert, cert_pem, key_pem)  # a TLS key and certificate, any role
    return cert_pem, key_pem
