"""The coordinator's federation folder: CA, server certificate, server.toml, enrolled sites."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import tomllib
from cryptography import x509

from medfed.core.config import ServerConfig, SuperLinkSection, load_toml, resolve, write_toml
from medfed.core.errors import ConfigError, IdentityError
from medfed.core.files import atomic_write
from medfed.core.identity import (
    CA_VALIDITY_DAYS,
    CertificateAuthority,
    load_certificate,
    load_certificates,
    load_site_public_key,
    public_key_fingerprint,
    public_key_pem,
    replace_server_identity,
    save_server_identity,
    write_ca_bundle,
)
from medfed.server.coordinators import CoordinatorCredential, CoordinatorRegistry

SERVER_TOML_HEADER = """\
# medfed federation server configuration (written by `medfed server init`).
# Paths are relative to this file. Start the server with:
#   medfed server start --config server.toml
"""


@dataclass(frozen=True)
class Federation:
    """A loaded federation folder."""

    config_path: Path
    config: ServerConfig

    @classmethod
    def load(cls, config_path: Path) -> Federation:
        """Load and validate server.toml."""
        return cls(Path(config_path).resolve(), load_toml(config_path, ServerConfig))

    def path(self, relative: str) -> Path:
        """Resolve a path of server.toml."""
        return resolve(self.config_path, relative)

    @property
    def ca_cert(self) -> Path:
        """The federation CA certificate (sites pin it)."""
        return self.path(self.config.tls.ca_cert)

    @property
    def runs_dir(self) -> Path:
        """Where run folders go."""
        return self.path(self.config.state.runs_dir)

    @property
    def coordinators(self) -> CoordinatorRegistry:
        """Who may use the Control API (``coordinators.toml``)."""
        return CoordinatorRegistry(self.path(self.config.state.coordinators_file))

    def credential(self, path: Path | None = None) -> CoordinatorCredential:
        """The coordinator credential at ``path``, else this folder's own."""
        return CoordinatorCredential.load(path or self.path(self.config.coordinator.credential))

    def ensure_coordinator(self) -> bool:
        """Give a federation made before coordinator credentials its first one.

        Returns whether one was made: a registry that does not exist yet gets this
        folder's credential (made if missing) as its first coordinator.
        """
        registry = self.coordinators
        if registry.path.exists():
            return False
        path = self.path(self.config.coordinator.credential)
        credential = (CoordinatorCredential.load(path) if path.exists()
                      else CoordinatorCredential.create(path, "coordinator"))
        registry.add(credential.name, credential.public_pem())
        return True

    @property
    def sites_file(self) -> Path:
        """The enrolled-sites registry."""
        return self.path(self.config.state.sites_file)

    # ------------------------------------------------------------------ sites

    def enrolled(self) -> list[dict[str, str]]:
        """Enrolled sites: name, fingerprint, public key (PEM), date."""
        if not self.sites_file.exists():
            return []
        try:
            data = tomllib.loads(self.sites_file.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"Not valid TOML: {exc}", where=str(self.sites_file)) from None
        return list(data.get("site", []))

    def enrol(self, public_key_path: Path, name: str) -> dict[str, str]:
        """Add a site's public key to the registry (idempotent for the same key and name)."""
        key = load_site_public_key(public_key_path)
        fingerprint = public_key_fingerprint(key)
        sites = self.enrolled()
        for site in sites:
            if site["fingerprint"] == fingerprint:
                if site["name"] != name:
                    raise IdentityError(
                        f"This key is already enrolled as site {site['name']!r}.",
                        where=str(public_key_path),
                        fix="each site needs its own key; run `medfed site init` for the new site",
                    )
                return site
            if site["name"] == name:
                raise IdentityError(
                    f"A site named {name!r} is already enrolled with another key.",
                    where=str(self.sites_file),
                    fix="choose another --name, or remove the old entry from sites.toml",
                )
        entry = {"name": name, "fingerprint": fingerprint,
                 "public_key": public_key_pem(key).decode(),
                 "enrolled": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        atomic_write(self.sites_file, tomli_w.dumps({"site": [*sites, entry]}).encode())
        return entry


def renew_server_cert(fed: Federation, *, days: int = 825) -> Path:
    """Issue a new server certificate from the federation CA (same host names).

    Each file is replaced atomically; the old certificate and key stay beside the new
    ones with a ``.old`` suffix. A running SuperLink serves the new certificate from its
    next TLS handshake on (``medfed.server.superlink_launcher``); sites need nothing
    new: they pin the CA, not the server certificate.
    """
    tls = fed.config.tls
    ca = CertificateAuthority.load(fed.path(tls.ca_cert), fed.path(tls.ca_key))
    return _reissue(fed, ca, days=days)


def _server_hosts(fed: Federation) -> list[str]:
    """The host names and IPs of the current server certificate, the public host first."""
    public = fed.config.superlink.public_host
    try:
        old = load_certificate(fed.path(fed.config.tls.cert))
        sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [*sans.get_values_for_type(x509.DNSName),
                 *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]
    except (IdentityError, x509.ExtensionNotFound):
        names = []
    return [public] + [h for h in names if h != public]


def _reissue(fed: Federation, ca: CertificateAuthority, *, days: int) -> Path:
    tls = fed.config.tls
    key, cert = ca.issue_server_cert(_server_hosts(fed), days=days)
    replace_server_identity(key, cert, fed.path(tls.cert), fed.path(tls.key))
    return fed.path(tls.cert)


# ------------------------------------------------------------------ CA rotation


@dataclass(frozen=True)
class CaFiles:
    """The files of a CA rotation, beside the federation CA (``tls.ca_cert``)."""

    next_cert: Path
    next_key: Path
    old_cert: Path
    old_key: Path
    bundle: Path

    @classmethod
    def of(cls, fed: Federation) -> CaFiles:
        """The rotation files of ``fed``."""
        ca = fed.ca_cert
        return cls(next_cert=ca.with_name("ca-next.pem"), next_key=ca.with_name("ca-next.key"),
                   old_cert=ca.with_name("ca-old.pem"), old_key=ca.with_name("ca-old.key"),
                   bundle=ca.with_name("ca-bundle.pem"))


def rotation_under_way(fed: Federation) -> bool:
    """True between `medfed server rotate-ca` and `rotate-ca --finish`."""
    return CaFiles.of(fed).next_cert.exists()


def begin_ca_rotation(fed: Federation, *, days: int = CA_VALIDITY_DAYS) -> Path:
    """Create the next federation CA and the bundle sites pin during the overlap.

    Nothing the server presents changes yet. Returns ``ca-bundle.pem`` (the current CA
    and the next one): each site puts it in place of its pinned CA, then
    :func:`finish_ca_rotation` switches the server to a certificate of the next CA.
    """
    files = CaFiles.of(fed)
    if files.next_cert.exists():
        raise IdentityError(
            "A CA rotation is already under way.", where=str(files.next_cert),
            fix="give every site ca-bundle.pem, then run `medfed server rotate-ca --finish`",
        )
    current = load_certificate(fed.ca_cert)
    nxt = CertificateAuthority.create(fed.config.federation, days=days)
    nxt.save(files.next_cert, files.next_key)
    write_ca_bundle(files.bundle, current, nxt.cert)
    return files.bundle


def finish_ca_rotation(fed: Federation, *, days: int = 825) -> Path:
    """Make the next CA the federation CA and give the server a certificate it issued.

    The previous CA is kept as ``ca-old.pem``/``ca-old.key`` and stays in
    ``ca-bundle.pem`` (sites that pinned the bundle trust both). Returns the new server
    certificate; a running SuperLink serves it from its next handshake on.
    """
    files = CaFiles.of(fed)
    tls = fed.config.tls
    if not files.next_cert.exists():
        raise IdentityError(
            "No CA rotation is under way.", where=str(files.next_cert),
            fix="start one with `medfed server rotate-ca`, give every site ca-bundle.pem, "
                "then run `medfed server rotate-ca --finish`",
        )
    nxt = CertificateAuthority.load(files.next_cert, files.next_key)
    old = load_certificate(fed.ca_cert)
    for src, dst in ((fed.ca_cert, files.old_cert), (fed.path(tls.ca_key), files.old_key)):
        dst.unlink(missing_ok=True)
        os.link(src, dst)
    write_ca_bundle(files.bundle, nxt.cert, old)
    # the key first: whoever loads the CA finds the key of the certificate it reads
    os.replace(files.next_key, fed.path(tls.ca_key))
    os.replace(files.next_cert, fed.ca_cert)
    return _reissue(fed, nxt, days=days)


def server_trust_file(fed: Federation) -> Path:
    """The CAs the SuperLink's own components (ServerApps) trust, frozen for one start.

    The federation CA, and during a CA rotation the next one too: a ServerApp started
    before `rotate-ca --finish` then still trusts the server certificate it serves after.
    """
    path = fed.path(fed.config.state.database).parent / "server-trust.pem"
    files = CaFiles.of(fed)
    cas = [load_certificate(fed.ca_cert)]
    if files.next_cert.exists():
        cas.append(load_certificate(files.next_cert))
    write_ca_bundle(path, *cas)
    return path


def server_trusts(fed: Federation, ca: x509.Certificate) -> bool:
    """True if the SuperLink started last trusts ``ca`` (see :func:`server_trust_file`)."""
    path = fed.path(fed.config.state.database).parent / "server-trust.pem"
    if not path.exists():
        return True  # never started with medfed's trust file: nothing to hold back
    return any(c == ca for c in load_certificates(path))


def init_federation(
    folder: Path, *, name: str, hosts: list[str], port: int, bind_host: str = "127.0.0.1"
) -> Path:
    """Create a federation folder: CA, server TLS identity, server.toml. Returns server.toml."""
    folder = Path(folder)
    config_path = folder / "server.toml"
    if config_path.exists():
        raise ConfigError(
            "A federation already exists in this folder.", where=str(config_path),
            fix="choose an empty folder, or use the existing server.toml",
        )
    folder.mkdir(parents=True, exist_ok=True)
    config = ServerConfig(
        federation=name,
        superlink=SuperLinkSection(host=bind_host, port=port, public_host=hosts[0]),
    )
    ca = CertificateAuthority.create(name)
    ca.save(folder / config.tls.ca_cert, folder / config.tls.ca_key)
    key, cert = ca.issue_server_cert(hosts)
    save_server_identity(key, cert, folder / config.tls.cert, folder / config.tls.key)
    for sub in (config.state.runs_dir, Path(config.state.database).parent):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_toml(config_path, config, header=SERVER_TOML_HEADER)
    Federation.load(config_path).ensure_coordinator()  # the Control API's first coordinator
    return config_path
