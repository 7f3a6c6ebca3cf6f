"""The coordinator's federation folder: CA, server certificate, server.toml, enrolled sites."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import tomli_w
import tomllib
from cryptography import x509

from medfed.core.config import ServerConfig, SuperLinkSection, load_toml, resolve, write_toml
from medfed.core.errors import ConfigError, IdentityError
from medfed.core.files import atomic_write
from medfed.core.identity import (
    CertificateAuthority,
    load_certificate,
    load_site_public_key,
    public_key_fingerprint,
    public_key_pem,
    save_server_identity,
)

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

    The old certificate and key are kept beside the new ones with a ``.old`` suffix.
    Sites need nothing new: they pin the CA, not the server certificate.
    """
    tls = fed.config.tls
    cert_path, key_path = fed.path(tls.cert), fed.path(tls.key)
    old = load_certificate(cert_path)
    sans = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    hosts = [str(v) for v in sans.get_values_for_type(x509.IPAddress)]
    hosts = [fed.config.superlink.public_host] + [
        h for h in sans.get_values_for_type(x509.DNSName) + hosts
        if h != fed.config.superlink.public_host
    ]
    ca = CertificateAuthority.load(fed.path(tls.ca_cert), fed.path(tls.ca_key))
    key, cert = ca.issue_server_cert(hosts, days=days)
    for path in (cert_path, key_path):
        path.replace(path.with_name(path.name + ".old"))
    save_server_identity(key, cert, cert_path, key_path)
    return cert_path


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
    return config_path
