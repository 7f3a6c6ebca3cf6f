"""A coordinator's signature on a run, checked by every site before it trains.

The coordinator signs the run's configuration (the exact JSON the sites receive),
with a fresh nonce, using its Ed25519 key, and attaches its certificate, issued by
the federation CA. A site checks the certificate against the CA it pinned and the
signature against the JSON: a SuperLink that was broken into cannot make sites spend
privacy budget on a run no coordinator launched, nor change a signed run's settings
on the way. The nonce makes every launch's proof unique, so a site can also refuse a
signed run replayed as another server run (client/signed_runs.py).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import secrets
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from medfed.core.key_certs import (
    COORDINATOR_USAGE,
    CertificateRejected,
    certificate_pem,
    check_key_cert,
)


class RunProofError(Exception):
    """The run carries no valid coordinator signature; ``str`` says what is wrong."""


@dataclass(frozen=True)
class VerifiedRun:
    """Who signed the run, their certificate's serial, and the proof's digest (one per launch)."""

    coordinator: str
    digest: str
    serial: int


def _message(run_json: str, nonce: str) -> bytes:
    return f"medfed-run-v2\n{nonce}\n".encode() + run_json.encode()


def sign_run(
    run_json: str, *, name: str, key: Ed25519PrivateKey, certificate: x509.Certificate
) -> str:
    """The proof (JSON) that coordinator ``name`` launched the run ``run_json``, now."""
    nonce = secrets.token_hex(16)
    return json.dumps(
        {
            "coordinator": name,
            "nonce": nonce,
            "certificate": certificate_pem(certificate),
            "signature": base64.b64encode(key.sign(_message(run_json, nonce))).decode(),
        }
    )


def verify_run(
    run_json: str, proof: str, cas: list[x509.Certificate], *, now: dt.datetime | None = None
) -> VerifiedRun:
    """Who signed ``run_json``; :class:`RunProofError` if no coordinator did.

    ``cas``: the federation CA certificates the site trusts (two during a rotation).
    """
    if not proof:
        raise RunProofError(
            "the run carries no coordinator signature (it was not launched "
            "through medfed by one of the federation's coordinators)"
        )
    try:
        data = json.loads(proof)
        name = str(data["coordinator"])
        nonce = str(data["nonce"])
        cert = x509.load_pem_x509_certificate(str(data["certificate"]).encode())
        signature = base64.b64decode(str(data["signature"]), validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise RunProofError(f"the run's coordinator signature is malformed ({exc})") from None
    try:
        key = check_key_cert(
            cert, cas, name=name, usage=COORDINATOR_USAGE, what=f"coordinator {name!r}", now=now
        )
    except CertificateRejected as exc:
        raise RunProofError(str(exc)) from None
    try:
        key.verify(signature, _message(run_json, nonce))
    except InvalidSignature:
        raise RunProofError(
            f"the run's configuration does not match coordinator {name!r}'s "
            "signature (changed on the way, or signed by someone else)"
        ) from None
    return VerifiedRun(name, hashlib.sha256(signature).hexdigest(), cert.serial_number)
