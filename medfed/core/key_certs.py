"""Ed25519 signing keys certified by the federation CA, and their check at a site.

Two kinds, told apart by their extended key usage (never a TLS usage): a coordinator's
key, which signs the runs sites train (run_proof.py), and a site's secure-aggregation
identity key, which signs its per-run key adverts. A site trusts either only with a
certificate its pinned CA issued: the relay (the SuperLink) can pass them on but not
make them.
"""

from __future__ import annotations

import datetime as dt

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID, ObjectIdentifier

#: "Signs the runs sites train". UUID-derived OIDs (2.25.<uuid>, ITU-T X.667) need no
#: registration.
COORDINATOR_USAGE = ObjectIdentifier("2.25.27532748563031946948050688927067755449")
#: "A site's secure-aggregation identity".
SECAGG_USAGE = ObjectIdentifier("2.25.160266516446346468117957917374530446338")
KEY_CERT_DAYS = 825
#: The file a site sends, beside keys/site.pub, to be enrolled (its key folder's name).
SECAGG_PUBLIC_NAME = "secagg-identity.pub"


class CertificateRejected(Exception):
    """The certificate does not vouch for the key; ``str`` says why."""


def issue_key_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    name: str,
    public_key: Ed25519PublicKey,
    usage: ObjectIdentifier,
    *,
    days: int = KEY_CERT_DAYS,
) -> x509.Certificate:
    """Certify ``public_key`` as ``name``'s, for ``usage`` only."""
    start = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA384())
    )


def check_key_cert(
    cert: x509.Certificate,
    cas: list[x509.Certificate],
    *,
    name: str,
    usage: ObjectIdentifier,
    what: str,
    now: dt.datetime | None = None,
) -> Ed25519PublicKey:
    """The Ed25519 key ``cert`` vouches for as ``name``'s; :class:`CertificateRejected` if not.

    ``cas``: the CA certificates the site trusts (two during a rotation); ``what``
    names the certificate in messages ("coordinator 'alice'", "site 'b'").
    """
    if not any(issued_by(cert, ca) for ca in cas):
        raise CertificateRejected(
            f"{what}'s certificate was not issued by the federation CA this site pinned"
        )
    moment = now or dt.datetime.now(dt.timezone.utc)
    if not cert.not_valid_before_utc <= moment <= cert.not_valid_after_utc:
        raise CertificateRejected(
            f"{what}'s certificate is not valid now "
            f"({cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )
    names = [n.value for n in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        usages = []
    key = cert.public_key()
    if names != [name] or usage not in usages or not isinstance(key, Ed25519PublicKey):
        raise CertificateRejected(
            f"the certificate attached is not one for {what} "
            f"(it names {', '.join(map(str, names)) or 'no one'})"
        )
    return key


def issue_revocations(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    serials: list[int],
    *,
    number: int,
) -> x509.CertificateRevocationList:
    """A CRL of the CA naming the revoked certificates' serials; ``number`` only grows."""
    now = dt.datetime.now(dt.timezone.utc)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=KEY_CERT_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca_key, hashes.SHA384())


def _load_revocations(pem: str) -> tuple[x509.CertificateRevocationList, int]:
    try:
        crl = x509.load_pem_x509_crl(pem.encode())
        return crl, crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except (ValueError, x509.ExtensionNotFound) as exc:
        raise CertificateRejected(f"the coordinator revocation list is malformed ({exc})") from None


def read_revocations(pem: str) -> tuple[int, frozenset[int]]:
    """(CRL number, revoked serials) of a CRL already checked; CertificateRejected if malformed."""
    crl, number = _load_revocations(pem)
    return number, frozenset(r.serial_number for r in crl)


def check_revocations(pem: str, cas: list[x509.Certificate]) -> tuple[int, frozenset[int]]:
    """(CRL number, revoked serials) of a CRL one of ``cas`` signed; CertificateRejected if not."""
    crl, number = _load_revocations(pem)
    for ca in cas:
        try:
            if crl.issuer == ca.subject and crl.is_signature_valid(ca.public_key()):
                return number, frozenset(r.serial_number for r in crl)
        except TypeError:  # a CA key type that cannot have signed it
            continue
    raise CertificateRejected(
        "the coordinator revocation list was not signed by the federation CA this site pinned"
    )


def raw_public_bytes(key: Ed25519PublicKey) -> bytes:
    """The 32 raw bytes of ``key`` (how secure aggregation names identity keys)."""
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def certificate_pem(cert: x509.Certificate) -> str:
    """``cert`` as PEM text."""
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    """Whether ``cert`` carries a valid signature of ``ca``."""
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:  # InvalidSignature, ValueError, TypeError: not this CA's
        return False
    return True
