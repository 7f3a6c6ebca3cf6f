"""Secure-aggregation identity keys certified by the federation CA at enrolment.

`medfed site init` writes the site's identity key; `medfed server enrol` has the CA
certify it; the server hands each site its peers' certificates with the directory;
a site daemon masks only when every key in the directory is the one the CA certified
for that site. A relay that substitutes a key, drops a certificate or brings one
from another CA is refused, naming the peer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from secure_site_builders import RUN, SiteFederation, joined, train_message

from medfed.client.secure_site import IDENTITY_PUBLIC_FILE, SecureSite, load_identity
from medfed.client.site import init_site
from medfed.core import wire
from medfed.core.identity import CertificateAuthority, load_certificates
from medfed.core.key_certs import SECAGG_USAGE, certificate_pem, check_key_cert, raw_public_bytes
from medfed.core.schema import SiteInstruction
from medfed.core.secagg import RosterError, SiteIdentity, fingerprint
from medfed.server.federation import (
    Federation,
    begin_ca_rotation,
    finish_ca_rotation,
    init_federation,
    secagg_certificates,
)

D = 16


def _enrolled(tmp_path: Path, n: int = 3) -> tuple[Federation, SiteFederation, dict[str, str]]:
    """A federation whose ``n`` sites were made by `site init` and enrolled; the run joined."""
    fed = Federation.load(
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=9999)
    )
    sites = joined(tmp_path / "sites", n, size=D)
    for i, (name, folder) in enumerate(sites.folders.items()):
        init_site(
            tmp_path / "init" / name, name=name, federation_ca=fed.ca_cert, runtime_port=9300 + i
        )
        keys = tmp_path / "init" / name / "keys"
        # the run's sites use the identity `site init` wrote (same folder layout)
        (folder / "keys").mkdir(parents=True, exist_ok=True)
        assert (keys / "secagg-identity.pub").exists()
        fed.enrol(keys / "site.pub", name, folder / IDENTITY_PUBLIC_FILE)
    cas = load_certificates(fed.ca_cert)
    for name, folder in sites.folders.items():
        sites.sites[name] = SecureSite(name, folder, federation_cas=lambda: cas)
    by_key = secagg_certificates(fed.sites_file)
    certified = {s: by_key[k] for s, k in sites.directory.items()}
    return fed, sites, certified


def _first_round(
    sites: SiteFederation,
    site: str,
    certificates: dict[str, str],
    directory: dict[str, bytes] | None = None,
) -> dict:
    config, blobs = train_message(sites, sorted(sites.sites), directory)
    config[wire.SECAGG_CERTIFICATES] = json.dumps(certificates)
    _, _, entry = sites.sites[site].mask(
        RUN,
        1,
        SiteInstruction.read(config, blobs),
        global_vec=np.zeros(D, np.float32),
        local_vec=np.ones(D, np.float32),
        weight=1.0,
    )
    return entry


def test_site_init_writes_the_identity_key_that_enrolment_certifies(tmp_path: Path) -> None:
    fed, sites, certified = _enrolled(tmp_path)
    entry = {s["name"]: s for s in fed.enrolled()}["site-b"]
    assert entry["secagg_fingerprint"] == fingerprint(sites.directory["site-b"])
    assert certified["site-b"] == entry["secagg_certificate"]
    # the key pair in the folder agrees with its public half
    assert load_identity(sites.folders["site-b"]).public_bytes == sites.directory["site-b"]


def test_every_certified_key_is_accepted_and_audited(tmp_path: Path) -> None:
    _, sites, certified = _enrolled(tmp_path)
    entry = _first_round(sites, "site-a", certified)
    assert entry["peers_certified"] == {
        s: fingerprint(sites.directory[s]) for s in ("site-b", "site-c")
    }
    assert "peers_pinned" not in entry


def test_a_substituted_key_is_detected_even_with_a_matching_self_made_certificate(
    tmp_path: Path,
) -> None:
    _, sites, certified = _enrolled(tmp_path)
    impostor = SiteIdentity.generate()
    substituted = {**sites.directory, "site-b": impostor.public_bytes}
    with pytest.raises(RosterError) as err:  # the real certificate, another key
        _first_round(sites, "site-a", certified, substituted)
    assert "site 'site-b'" in str(err.value)
    assert fingerprint(impostor.public_bytes) in str(err.value)
    assert not sites.sites["site-a"].session(RUN).has_roster  # nothing was masked
    rogue = CertificateAuthority.create("rogue")
    forged = certificate_pem(
        rogue.issue_key_cert("site-b", impostor.private_key.public_key(), SECAGG_USAGE)
    )
    with pytest.raises(RosterError, match="not issued by the federation CA"):
        _first_round(sites, "site-a", {**certified, "site-b": forged}, substituted)
    missing = {s: c for s, c in certified.items() if s != "site-c"}
    with pytest.raises(RosterError, match="'site-c'.*without a certificate"):
        _first_round(sites, "site-a", missing)
    # a certificate of site-c's key presented for site-b: names differ
    with pytest.raises(RosterError, match="not one for site 'site-b'"):
        _first_round(
            sites,
            "site-a",
            {**certified, "site-b": certified["site-c"]},
            {**sites.directory, "site-b": sites.directory["site-c"]},
        )


def test_re_enrolment_replaces_the_key_and_a_ca_rotation_recertifies_it(tmp_path: Path) -> None:
    fed, sites, _ = _enrolled(tmp_path, 2)
    site_pub = tmp_path / "init" / "site-b" / "keys" / "site.pub"
    new = SiteIdentity.generate()
    (tmp_path / "new.pub").write_bytes(
        new.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    fed.enrol(site_pub, "site-b", tmp_path / "new.pub")  # the site re-keyed
    by_key = secagg_certificates(fed.sites_file)
    assert new.public_bytes in by_key and sites.directory["site-b"] not in by_key
    begin_ca_rotation(fed)
    finish_ca_rotation(fed)
    new_ca = load_certificates(fed.ca_cert)[:1]  # only the new CA, once the old is dropped
    names = {}
    for key, pem in secagg_certificates(fed.sites_file).items():
        cert = x509.load_pem_x509_certificate(pem.encode())
        name = str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)
        assert (
            raw_public_bytes(check_key_cert(cert, new_ca, name=name, usage=SECAGG_USAGE, what=name))
            == key
        )
        names[name] = key
    assert names == {"site-a": sites.directory["site-a"], "site-b": new.public_bytes}
