"""The coordinator's federation folder: CA, server certificate, server.toml, enrolled sites."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import tomllib
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

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
from medfed.core.key_certs import (
    SECAGG_PUBLIC_NAME,
    SECAGG_USAGE,
    certificate_pem,
    raw_public_bytes,
)
from medfed.core.secagg import fingerprint as secagg_fingerprint
from medfed.server.coordinators import CoordinatorCredential, CoordinatorRegistry

REVOCATIONS_NAME = "revoked-coordinators.pem"

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
        folder's credential (made if missing) as its first coordinator; this folder's
        credential, if it has no certificate yet, gets one from the federation CA.
        """
        registry = self.coordinators
        path = self.path(self.config.coordinator.credential)
        if registry.path.exists():
            own = CoordinatorCredential.load(path) if path.exists() else None
            if own is not None and own.certificate is None:
                # made before runs were signed: certify it, or sites refuse its runs
                own.recertify(path, self.certificate_authority())
            return False
        credential = (
            CoordinatorCredential.load(path)
            if path.exists()
            else CoordinatorCredential.create(path, "coordinator", ca=self.certificate_authority())
        )
        registry.add(credential.name, credential.public_pem(), credential.certificate_pem())
        return True

    @property
    def revocations_file(self) -> Path:
        """The CA's revocation list of coordinator certificates (PEM CRL), for the sites."""
        return self.ca_cert.parent / REVOCATIONS_NAME

    def revoke_coordinator(self, name: str) -> bool:
        """Refuse ``name``'s Control API calls, and put its certificate on the CA's list.

        The server sends the list with every run's messages; sites refuse runs its
        coordinators signed. Returns False if the entry had no certificate to revoke.
        """
        registry = self.coordinators
        registry.revoke(name)
        self.write_revocations(self.certificate_authority())
        return bool(registry.entries()[name].get("certificate"))

    def write_revocations(self, ca: CertificateAuthority) -> None:
        """Issue the revocation list again with ``ca`` (its number one higher)."""
        number = 0
        if self.revocations_file.exists():
            crl = x509.load_pem_x509_crl(self.revocations_file.read_bytes())
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        crl = ca.issue_revocations(self.coordinators.revoked_serials(), number=number)
        atomic_write(self.revocations_file, crl.public_bytes(serialization.Encoding.PEM))

    def certificate_authority(self) -> CertificateAuthority:
        """The federation CA with its key (on the server host only)."""
        tls = self.config.tls
        return CertificateAuthority.load(self.path(tls.ca_cert), self.path(tls.ca_key))

    @property
    def sites_file(self) -> Path:
        """The enrolled-sites registry."""
        return self.path(self.config.state.sites_file)

    # ------------------------------------------------------------------ sites

    def enrolled(self) -> list[dict[str, str]]:
        """Enrolled sites: name, fingerprint, public key (PEM), date, secagg certificate."""
        return read_enrolled(self.sites_file)

    def enrol(
        self, public_key_path: Path, name: str, secagg_key_path: Path | None = None
    ) -> dict[str, str]:
        """Add a site's public key to the registry (idempotent for the same key and name).

        The site's secure-aggregation identity key (``secagg_key_path``, by default the
        ``secagg-identity.pub`` beside the site key) gets a certificate of the federation
        CA, which the server hands to the other sites so they can check it; enrolling
        the same site again with a new one replaces it (the site re-keyed).
        """
        key = load_site_public_key(public_key_path)
        fingerprint = public_key_fingerprint(key)
        if secagg_key_path is None and (public_key_path.parent / SECAGG_PUBLIC_NAME).exists():
            secagg_key_path = public_key_path.parent / SECAGG_PUBLIC_NAME
        secagg = {} if secagg_key_path is None else self._certify_secagg(secagg_key_path, name)
        sites = self.enrolled()
        for i, site in enumerate(sites):
            if site["fingerprint"] == fingerprint:
                if site["name"] != name:
                    raise IdentityError(
                        f"This key is already enrolled as site {site['name']!r}.",
                        where=str(public_key_path),
                        fix="each site needs its own key; run `medfed site init` for the new site",
                    )
                if not secagg or secagg["secagg_fingerprint"] == site.get("secagg_fingerprint"):
                    return site
                sites[i] = {**site, **secagg}
                atomic_write(self.sites_file, tomli_w.dumps({"site": sites}).encode())
                return sites[i]
            if site["name"] == name:
                raise IdentityError(
                    f"A site named {name!r} is already enrolled with another key.",
                    where=str(self.sites_file),
                    fix="choose another --name, or remove the old entry from sites.toml",
                )
        entry = {
            "name": name,
            "fingerprint": fingerprint,
            "public_key": public_key_pem(key).decode(),
            "enrolled": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            **secagg,
        }
        atomic_write(self.sites_file, tomli_w.dumps({"site": [*sites, entry]}).encode())
        return entry

    def _certify_secagg(self, path: Path, name: str) -> dict[str, str]:
        """The registry fields of a site's certified secure-aggregation identity key."""
        key = load_secagg_public_key(path)
        cert = self.certificate_authority().issue_key_cert(name, key, SECAGG_USAGE)
        return {
            "secagg_fingerprint": secagg_fingerprint(raw_public_bytes(key)),
            "secagg_certificate": certificate_pem(cert),
        }


def read_enrolled(sites_file: Path) -> list[dict[str, str]]:
    """The entries of an enrolled-sites registry (none if it does not exist yet)."""
    if not sites_file.exists():
        return []
    try:
        data = tomllib.loads(sites_file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"Not valid TOML: {exc}", where=str(sites_file)) from None
    return list(data.get("site", []))


def secagg_certificates(sites_file: Path) -> dict[bytes, str]:
    """Enrolled sites' secure-aggregation certificates (PEM), by the raw key they certify."""
    return {
        raw_public_bytes(key): site["secagg_certificate"]
        for site in read_enrolled(sites_file)
        if (key := _secagg_key(site)) is not None
    }


def _secagg_key(site: dict[str, str]) -> Ed25519PublicKey | None:
    """The secure-aggregation key an enrolled site's certificate vouches for (None: none)."""
    pem = site.get("secagg_certificate")
    key = x509.load_pem_x509_certificate(pem.encode()).public_key() if pem else None
    return key if isinstance(key, Ed25519PublicKey) else None


def load_secagg_public_key(path: Path) -> Ed25519PublicKey:
    """A site's ``secagg-identity.pub`` (Ed25519, PEM); a clear error for anything else."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except OSError as exc:
        raise IdentityError(
            f"Cannot read the site's secure-aggregation key: {exc.strerror}.",
            where=str(path),
            fix=f"ask the site operator for their keys/{SECAGG_PUBLIC_NAME}",
        ) from None
    except ValueError:
        key = None
    if not isinstance(key, Ed25519PublicKey):
        raise IdentityError(
            "Not a secure-aggregation identity key.",
            where=str(path),
            expected=f"the site's keys/{SECAGG_PUBLIC_NAME} (an Ed25519 public "
            "key, PEM), written by `medfed site init`",
        )
    return key


def _recertify_secagg(fed: Federation, ca: CertificateAuthority) -> None:
    """Certify every enrolled site's secure-aggregation key again, with ``ca``."""
    sites = fed.enrolled()
    for site in sites:
        if (key := _secagg_key(site)) is not None:
            site["secagg_certificate"] = certificate_pem(
                ca.issue_key_cert(site["name"], key, SECAGG_USAGE)
            )
    if sites:
        atomic_write(fed.sites_file, tomli_w.dumps({"site": sites}).encode())


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
        names = [
            *sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress)),
        ]
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
        return cls(
            next_cert=ca.with_name("ca-next.pem"),
            next_key=ca.with_name("ca-next.key"),
            old_cert=ca.with_name("ca-old.pem"),
            old_key=ca.with_name("ca-old.key"),
            bundle=ca.with_name("ca-bundle.pem"),
        )


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
            "A CA rotation is already under way.",
            where=str(files.next_cert),
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
    ``ca-bundle.pem`` (sites that pinned the bundle trust both). This folder's own
    coordinator credential is certified again by the new CA (other coordinators get
    new credentials with `medfed server coordinators add`). Returns the new server
    certificate; a running SuperLink serves it from its next handshake on.
    """
    files = CaFiles.of(fed)
    tls = fed.config.tls
    if not files.next_cert.exists():
        raise IdentityError(
            "No CA rotation is under way.",
            where=str(files.next_cert),
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
    own = fed.path(fed.config.coordinator.credential)
    if own.exists():  # runs it signs must verify at sites that keep only the new CA
        CoordinatorCredential.load(own).recertify(own, nxt)
    _recertify_secagg(fed, nxt)  # so must the sites' secure-aggregation keys
    if fed.revocations_file.exists():  # and the revocation list, at sites with only the new CA
        fed.write_revocations(nxt)
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
    folder: Path,
    *,
    name: str,
    hosts: list[str],
    port: int,
    bind_host: str = "127.0.0.1",
    control_from: list[str] | None = None,
) -> Path:
    """Create a federation folder: CA, server TLS identity, server.toml. Returns server.toml.

    ``control_from``: the sources the Control API admits (default: this host only).
    """
    folder = Path(folder)
    config_path = folder / "server.toml"
    if config_path.exists():
        raise ConfigError(
            "A federation already exists in this folder.",
            where=str(config_path),
            fix="choose an empty folder, or use the existing server.toml",
        )
    try:
        link = SuperLinkSection(
            host=bind_host,
            port=port,
            public_host=hosts[0],
            control_from=control_from or ["this-host"],
        )
    except ValidationError as exc:
        raise ConfigError(
            f"Not a usable setting: {exc.errors()[0]['msg']}.",
            where="--control-from / --port",
            expected="'this-host', 'any' or networks such as 10.20.0.0/16",
        ) from None
    folder.mkdir(parents=True, exist_ok=True)
    config = ServerConfig(federation=name, superlink=link)
    ca = CertificateAuthority.create(name)
    ca.save(folder / config.tls.ca_cert, folder / config.tls.ca_key)
    key, cert = ca.issue_server_cert(hosts)
    save_server_identity(key, cert, folder / config.tls.cert, folder / config.tls.key)
    for sub in (config.state.runs_dir, Path(config.state.database).parent):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    write_toml(config_path, config, header=SERVER_TOML_HEADER)
    Federation.load(config_path).ensure_coordinator()  # the Control API's first coordinator
    return config_path
