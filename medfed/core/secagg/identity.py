"""Site signing identity for secure aggregation (Ed25519).

The coordinator enrols each site's identity public key (32 raw bytes) together with
its SuperNode key; every site pins the directory of enrolled identity keys, just as
it pins the federation CA. Signatures bind each site's per-run X25519 key and each
masked update to that identity, so the server can neither substitute keys (no
man in the middle) nor forge, replay or alter an update unnoticed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from medfed.core.secagg.errors import RosterError


@dataclass(frozen=True)
class SiteIdentity:
    """A site's long-term Ed25519 signing key."""

    private_key: Ed25519PrivateKey

    @classmethod
    def generate(cls) -> SiteIdentity:
        """A fresh identity (once, at site enrolment)."""
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_private_bytes(cls, raw: bytes) -> SiteIdentity:
        """Load from the 32 raw private bytes (the site keeps them owner-only)."""
        return cls(Ed25519PrivateKey.from_private_bytes(raw))

    def private_bytes(self) -> bytes:
        """The 32 raw private bytes, for the site's key file (owner-only)."""
        return self.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )

    @property
    def public_bytes(self) -> bytes:
        """The 32 raw public bytes the coordinator enrols."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature of ``message``."""
        return self.private_key.sign(message)

    @staticmethod
    def verify(public: bytes, signature: bytes, message: bytes) -> bool:
        """True iff ``signature`` is ``public``'s signature of ``message``."""
        try:
            Ed25519PublicKey.from_public_bytes(public).verify(signature, message)
        except (InvalidSignature, ValueError):
            return False
        return True


def check_directory(directory: Mapping[str, bytes]) -> dict[str, bytes]:
    """Validate an identity directory (site id -> 32-byte Ed25519 public key)."""
    out: dict[str, bytes] = {}
    for site, key in directory.items():
        if not isinstance(site, str) or not site:
            raise RosterError("an identity directory entry has an empty site id")
        try:
            Ed25519PublicKey.from_public_bytes(bytes(key))
        except ValueError:
            raise RosterError(
                "an enrolled identity key is not a 32-byte Ed25519 public key",
                where=f"site {site!r}",
                fix="re-enrol the site's secure-aggregation identity",
            ) from None
        out[site] = bytes(key)
    return out


def fingerprint(public: bytes) -> str:
    """Short SHA-256 fingerprint of an identity public key, for operators to compare."""
    return "sha256:" + hashlib.sha256(public).hexdigest()[:32]
