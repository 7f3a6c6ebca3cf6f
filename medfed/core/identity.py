"""Federation identity with `cryptography`: a CA, the server's TLS certificate, site keys.

The coordinator's CA signs the SuperLink's TLS certificate; sites pin that CA.
Each site holds an EC key pair (NIST P-384, the curve Flower's SuperNode
authentication expects); the coordinator enrols the public half.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import ipaddress
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from medfed.core.errors import IdentityError
from medfed.core.files import atomic_write
from medfed.core.key_certs import issue_key_cert, issue_revocations, issued_by

CURVE = ec.SECP384R1()
CA_VALIDITY_DAYS = 3650
SERVER_VALIDITY_DAYS = 825  # the maximum most TLS clients accept for a leaf


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def write_private(path: Path, data: bytes) -> None:
    """Write key material readable by the owner only, never over an existing file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def write_public(path: Path, data: bytes) -> None:
    """Write a certificate or public key; refuse to overwrite one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "xb") as fh:
        fh.write(data)


def _private_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@dataclass(frozen=True)
class CertificateAuthority:
    """The federation's CA: its key signs the server certificate."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str, *, days: int = CA_VALIDITY_DAYS) -> CertificateAuthority:
        """Create a self-signed CA for the federation ``name``."""
        key = ec.generate_private_key(CURVE)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"medfed CA {name}")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA384())
        )
        return cls(key=key, cert=cert)

    def issue_server_cert(
        self,
        hosts: list[str],
        *,
        days: int = SERVER_VALIDITY_DAYS,
        not_before: dt.datetime | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Issue a TLS server certificate whose SANs are ``hosts`` (names or IPs)."""
        if not hosts:
            raise IdentityError(
                "A server certificate needs at least one host name or IP address.",
                expected="--host 127.0.0.1 (repeatable)",
            )
        sans: list[x509.GeneralName] = []
        for host in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                sans.append(x509.DNSName(host))
        return self._issue_tls_leaf(
            hosts[0], ExtendedKeyUsageOID.SERVER_AUTH, days, not_before, sans=sans
        )

    def issue_client_cert(
        self, name: str, *, days: int = SERVER_VALIDITY_DAYS
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """Issue a TLS client certificate for ``name`` (mutual TLS, e.g. to a PACS's proxy)."""
        return self._issue_tls_leaf(name, ExtendedKeyUsageOID.CLIENT_AUTH, days, None)

    def _issue_tls_leaf(
        self,
        name: str,
        usage: ObjectIdentifier,
        days: int,
        not_before: dt.datetime | None,
        *,
        sans: list[x509.GeneralName] | None = None,
    ) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """A fresh key and its certificate for ``name``, valid for TLS ``usage`` only."""
        key = ec.generate_private_key(CURVE)
        start = not_before or (_now() - dt.timedelta(minutes=5))
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=days))
        )
        if sans is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = (
            builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
            .sign(self.key, hashes.SHA384())
        )
        return key, cert

    def issue_key_cert(
        self, name: str, public_key: ed25519.Ed25519PublicKey, usage: ObjectIdentifier
    ) -> x509.Certificate:
        """Certify an Ed25519 signing key as ``name``'s, for ``usage`` (key_certs.py)."""
        return issue_key_cert(self.key, self.cert, name, public_key, usage)

    def issue_revocations(
        self, serials: list[int], *, number: int
    ) -> x509.CertificateRevocationList:
        """A CRL naming ``serials`` (revoked coordinator certificates)."""
        return issue_revocations(self.key, self.cert, serials, number=number)

    def save(self, cert_path: Path, key_path: Path) -> None:
        """Write the CA certificate and its (owner-only) key."""
        write_private(key_path, _private_pem(self.key))
        write_public(cert_path, self.cert.public_bytes(serialization.Encoding.PEM))

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertificateAuthority:
        """Load a CA written by :meth:`save`."""
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise IdentityError("The CA key is not an EC key.", where=str(key_path))
        return cls(key=key, cert=load_certificate(cert_path))


def save_server_identity(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, cert_path: Path, key_path: Path
) -> None:
    """Write the server's TLS key (owner-only) and certificate."""
    write_private(key_path, _private_pem(key))
    write_public(cert_path, cert.public_bytes(serialization.Encoding.PEM))


def replace_server_identity(
    key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, cert_path: Path, key_path: Path
) -> None:
    """Replace the server's TLS key and certificate in place, keeping the old as ``.old``.

    Each file is replaced atomically (a reader sees the old file or the new one); the
    key first, so that a reader that sees the new certificate also finds its key.
    """
    for path in (key_path, cert_path):
        if path.exists():
            old = path.with_name(path.name + ".old")
            old.unlink(missing_ok=True)
            os.link(path, old)
    atomic_write(key_path, _private_pem(key))  # its temporary file is owner-only (mkstemp)
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    os.chmod(cert_path, 0o644)


def write_ca_bundle(path: Path, *cas: x509.Certificate) -> Path:
    """Write several CA certificates into one PEM file (TLS clients trust each of them)."""
    return atomic_write(path, b"".join(ca.public_bytes(serialization.Encoding.PEM) for ca in cas))


def load_certificate(path: Path) -> x509.Certificate:
    """Load a PEM certificate, or say clearly why it is not one."""
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise IdentityError(
            "Certificate file not found.",
            where=str(path),
            fix="check the path in the config, or re-run `medfed server init`",
        ) from None
    except ValueError as exc:
        raise IdentityError(
            f"Not a PEM certificate: {exc}",
            where=str(path),
            expected="a file starting with '-----BEGIN CERTIFICATE-----'",
        ) from None


def load_certificates(path: Path) -> list[x509.Certificate]:
    """Every certificate of a PEM file (a CA bundle holds several), or say why there is none."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(
            "Certificate file not found.",
            where=str(path),
            fix="check the path in the config, or ask the coordinator for the federation's ca.pem",
        ) from None
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise IdentityError(
            f"Not a PEM certificate: {exc}",
            where=str(path),
            expected="a file starting with '-----BEGIN CERTIFICATE-----'",
        ) from None


def check_certificate_valid(cert: x509.Certificate, *, where: str) -> None:
    """Fail if ``cert`` is expired or not yet valid, saying when and what to do."""
    now = _now()
    if cert.not_valid_after_utc < now:
        raise IdentityError(
            f"The certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC.",
            where=where,
            fix="issue a new one with `medfed server renew-cert --config server.toml`",
        )
    if cert.not_valid_before_utc > now:
        raise IdentityError(
            f"The certificate is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC.",
            where=where,
            fix="check this machine's clock, or issue a new certificate",
        )


def check_issued_by(cert: x509.Certificate, ca: x509.Certificate, *, where: str) -> None:
    """Fail unless ``cert`` carries a valid signature of ``ca`` (a wrong CA is caught here)."""
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, Exception) as exc:  # InvalidSignature has no common base
        raise IdentityError(
            "The server certificate was not issued by the federation CA this side trusts.",
            where=where,
            expected=f"a certificate signed by {ca.subject.rfc4514_string()}",
            fix="ask the coordinator for the federation's ca.pem and point the config at it",
        ) from exc


@dataclass(frozen=True)
class SiteKeys:
    """A site's key pair for SuperNode authentication."""

    private_key: ec.EllipticCurvePrivateKey

    @classmethod
    def create(cls) -> SiteKeys:
        """Generate a fresh key pair."""
        return cls(private_key=ec.generate_private_key(CURVE))

    def public_openssh(self) -> bytes:
        """The public key in OpenSSH format (what the coordinator enrols)."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )

    def save(self, private_path: Path, public_path: Path) -> None:
        """Write the private key (owner-only) and the public key (one OpenSSH line).

        The private key is in OpenSSH format, the one Flower's SuperNode reads.
        """
        write_private(
            private_path,
            self.private_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.OpenSSH,
                serialization.NoEncryption(),
            ),
        )
        write_public(public_path, self.public_openssh() + b"\n")


def load_site_public_key(path: Path) -> ec.EllipticCurvePublicKey:
    """Load a site's public key (OpenSSH or PEM), or say why it is not one."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise IdentityError(
            "Site public key file not found.",
            where=str(path),
            fix="the site operator finds it as keys/site.pub in the site folder",
        ) from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_public_key(data)
        else:
            key = serialization.load_ssh_public_key(data.strip())
    except (ValueError, Exception) as exc:
        raise IdentityError(
            f"Not a public key: {exc}",
            where=str(path),
            expected="an OpenSSH 'ecdsa-sha2-nistp384 ...' line or a PEM public key",
        ) from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise IdentityError(
            "The site key is not an elliptic-curve key.",
            where=str(path),
            expected="a NIST EC key (P-384), as `medfed site init` creates",
        )
    return key


def public_key_pem(key: ec.EllipticCurvePublicKey) -> bytes:
    """SubjectPublicKeyInfo PEM, the form Flower's node registry stores."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_key_fingerprint(key: ec.EllipticCurvePublicKey) -> str:
    """A short stable fingerprint of a public key (SHA-256 of its DER form)."""
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "sha256:" + hashlib.sha256(der).hexdigest()[:32]


# ------------------------------------------------------------ TLS failures, explained


class TlsProblem(enum.Enum):
    """Why a TLS client that pins ``pinned`` CAs refuses a server's certificate."""

    UNKNOWN_CA = "the server's certificate is issued by a CA the client does not pin"
    SERVER_CERT_EXPIRED = "the server's certificate has expired"
    PINNED_CA_EXPIRED = "the CA the client pins has expired"
    NOT_YET_VALID = "a certificate is not valid yet (a clock is wrong)"
    WRONG_HOST = "the server's certificate does not name the address dialled"
    NO_CERTIFICATE = "no TLS server answers at the address"


@dataclass(frozen=True)
class TlsDiagnosis:
    """One :class:`TlsProblem` and the facts behind it (names and dates), in a sentence."""

    problem: TlsProblem
    detail: str


def _cn(name: x509.Name) -> str:
    cns = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else name.rfc4514_string()


def _names_host(cert: x509.Certificate, host: str) -> bool:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        return ipaddress.ip_address(host) in sans.get_values_for_type(x509.IPAddress)
    except ValueError:
        return host.lower() in (n.lower() for n in sans.get_values_for_type(x509.DNSName))


def diagnose_server_certificate(
    server_cert: x509.Certificate | None,
    pinned: list[x509.Certificate],
    *,
    host: str,
    now: dt.datetime | None = None,
) -> TlsDiagnosis | None:
    """Why a client pinning ``pinned`` rejects ``server_cert`` (presented at ``host``).

    None when nothing is wrong with the certificate itself (the failure lies elsewhere).
    A pure function of the certificates: the daemon and the coordinator's commands both
    explain a refused handshake with it.
    """
    now = now or _now()
    day = "%Y-%m-%d %H:%M UTC"
    if server_cert is None:
        return TlsDiagnosis(TlsProblem.NO_CERTIFICATE, "no server presented a certificate")
    issuer = next((ca for ca in pinned if issued_by(server_cert, ca)), None)
    valid_pins = [ca for ca in pinned if ca.not_valid_after_utc >= now]
    if issuer is None and pinned and not valid_pins:
        last = max(ca.not_valid_after_utc for ca in pinned)
        return TlsDiagnosis(
            TlsProblem.PINNED_CA_EXPIRED,
            f"the pinned CA {_cn(pinned[0].subject)!r} expired on {last:{day}}",
        )
    if issuer is None:
        pins = ", ".join(repr(_cn(ca.subject)) for ca in pinned) or "none"
        return TlsDiagnosis(
            TlsProblem.UNKNOWN_CA,
            f"the server's certificate is issued by {_cn(server_cert.issuer)!r}; the pinned "
            f"CA file holds {pins}",
        )
    if issuer.not_valid_after_utc < now:
        return TlsDiagnosis(
            TlsProblem.PINNED_CA_EXPIRED,
            f"the pinned CA {_cn(issuer.subject)!r} expired on {issuer.not_valid_after_utc:{day}}",
        )
    if server_cert.not_valid_after_utc < now:
        return TlsDiagnosis(
            TlsProblem.SERVER_CERT_EXPIRED,
            f"the server's certificate expired on {server_cert.not_valid_after_utc:{day}}",
        )
    for cert, whose in ((issuer, "the pinned CA"), (server_cert, "the server's certificate")):
        if cert.not_valid_before_utc > now:
            return TlsDiagnosis(
                TlsProblem.NOT_YET_VALID,
                f"{whose} is valid only from {cert.not_valid_before_utc:{day}} "
                f"(this machine's clock says {now:{day}})",
            )
    if not _names_host(server_cert, host):
        return TlsDiagnosis(
            TlsProblem.WRONG_HOST, f"the server's certificate does not name {host!r}"
        )
    return None


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> (host, port)."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def fetch_server_certificate(address: str, *, timeout: float = 5.0) -> x509.Certificate | None:
    """The certificate a TLS server at ``address`` presents, unverified (to explain a refusal).

    None if nothing answers there, or it speaks no TLS.
    """
    host, port = split_address(address)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=timeout)
    except (OSError, ssl.SSLError, ValueError):
        return None
    return x509.load_pem_x509_certificate(pem.encode("ascii"))


def diagnose_tls(address: str, ca_file: Path) -> TlsDiagnosis | None:
    """Dial ``address`` and explain why a client pinning ``ca_file`` rejects its certificate."""
    try:
        pinned = load_certificates(ca_file)
    except IdentityError:
        pinned = []
    return diagnose_server_certificate(
        fetch_server_certificate(address), pinned, host=split_address(address)[0]
    )
