"""Federation identity: CA, server certificate, site keys, enrolment."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from medfed.core.errors import IdentityError
from medfed.core.identity import (
    CertificateAuthority,
    SiteKeys,
    check_certificate_valid,
    check_issued_by,
    load_site_public_key,
)
from medfed.server.federation import Federation, init_federation


def test_server_certificate_has_sans_and_chains_to_ca() -> None:
    ca = CertificateAuthority.create("t")
    _, cert = ca.issue_server_cert(["127.0.0.1", "localhost"])
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    check_issued_by(cert, ca.cert, where="test")
    check_certificate_valid(cert, where="test")


def test_wrong_ca_is_detected() -> None:
    ca, other = CertificateAuthority.create("a"), CertificateAuthority.create("b")
    _, cert = ca.issue_server_cert(["127.0.0.1"])
    with pytest.raises(IdentityError) as err:
        check_issued_by(cert, other.cert, where="server.pem")
    assert "ca.pem" in err.value.fix


def test_expired_certificate_is_detected() -> None:
    ca = CertificateAuthority.create("a")
    past = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=10)
    _, cert = ca.issue_server_cert(["127.0.0.1"], days=1, not_before=past)
    with pytest.raises(IdentityError, match="expired"):
        check_certificate_valid(cert, where="server.pem")


def test_site_keys_are_openssh_ec(tmp_path: Path) -> None:
    keys = SiteKeys.create()
    keys.save(tmp_path / "site.key", tmp_path / "site.pub")
    private = load_ssh_private_key((tmp_path / "site.key").read_bytes(), None)
    assert (
        private.public_key().public_numbers()
        == load_site_public_key(tmp_path / "site.pub").public_numbers()
    )
    assert (tmp_path / "site.key").stat().st_mode & 0o077 == 0
    assert (tmp_path / "site.pub").read_text().startswith("ecdsa-sha2-nistp384 ")


def test_not_a_key_is_explained(tmp_path: Path) -> None:
    (tmp_path / "x.pub").write_text("hello")
    with pytest.raises(IdentityError, match="Not a public key"):
        load_site_public_key(tmp_path / "x.pub")


def test_enrolment_is_idempotent_and_unique(tmp_path: Path) -> None:
    fed = Federation.load(
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=9999)
    )
    for n in ("a", "b"):
        SiteKeys.create().save(tmp_path / f"{n}.key", tmp_path / f"{n}.pub")
    fed.enrol(tmp_path / "a.pub", "site-a")
    fed.enrol(tmp_path / "a.pub", "site-a")
    assert [s["name"] for s in fed.enrolled()] == ["site-a"]
    with pytest.raises(IdentityError, match="already enrolled as site"):
        fed.enrol(tmp_path / "a.pub", "other")
    with pytest.raises(IdentityError, match="another key"):
        fed.enrol(tmp_path / "b.pub", "site-a")


def test_init_refuses_existing_federation(tmp_path: Path) -> None:
    init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=9999)
    with pytest.raises(Exception, match="already exists"):
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=9999)


def test_renew_server_cert_keeps_hosts_and_ca(tmp_path: Path) -> None:
    from medfed.core.identity import load_certificate
    from medfed.server.federation import renew_server_cert

    fed = Federation.load(
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1", "localhost"], port=9999)
    )
    old = load_certificate(fed.path(fed.config.tls.cert))
    new_path = renew_server_cert(fed)
    new = load_certificate(new_path)
    assert new.serial_number != old.serial_number
    check_issued_by(new, load_certificate(fed.ca_cert), where="t")
    sans = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in sans.get_values_for_type(x509.DNSName)
    assert (new_path.parent / "server.pem.old").exists()
