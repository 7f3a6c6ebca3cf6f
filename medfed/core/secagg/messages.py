"""Secure-aggregation messages: typed, signed, and encoded as bytes or (bytes, ndarray).

No pickle: headers are JSON (bytes fields in base64), the one big vector is a raw
little-endian unsigned numpy array. Each ``signed_payload`` is what the sender
signs: every field that changes the meaning, framed by :func:`prg.frame`.

Flower mapping (done by the lead at the edge): header bytes -> ConfigRecord value,
vector -> ArrayRecord array; see docs/secure-aggregation.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medfed.core import bulk_hash
from medfed.core.secagg.errors import MalformedMessageError
from medfed.core.secagg.prg import frame

MAGIC = b"MFSA1"
# How a masked update's vector is hashed; named in its header and under its signature.
# Updates from earlier versions (SHA-256, no name) are refused as malformed, with the fix.
DIGEST = bulk_hash.SEGMENTED
UNKNOWN = "<unknown>"


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text.encode("ascii"), validate=True)


def _dump(kind: str, body: dict[str, Any]) -> bytes:
    return (
        MAGIC + json.dumps({"type": kind, **body}, sort_keys=True, separators=(",", ":")).encode()
    )


def _load(kind: str, raw: bytes) -> dict[str, Any]:
    if not isinstance(raw, (bytes, bytearray)) or not bytes(raw).startswith(MAGIC):
        raise MalformedMessageError(UNKNOWN, f"not a medfed secure-aggregation {kind}")
    try:
        data = json.loads(bytes(raw)[len(MAGIC) :])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedMessageError(UNKNOWN, f"{kind} header is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("type") != kind:
        got = data.get("type") if isinstance(data, dict) else type(data).__name__
        raise MalformedMessageError(UNKNOWN, f"expected a {kind}, got {got!r}")
    return data


def _digest_map(items: Mapping[str, bytes]) -> bytes:
    return hashlib.sha256(frame(*(p for k in sorted(items) for p in (k, items[k])))).digest()


def vector_digest(vector: np.ndarray) -> bytes:
    """The :data:`DIGEST` of a vector's raw bytes (what a signature covers)."""
    return bulk_hash.segmented_digest(vector)


@dataclass(frozen=True)
class KeyAdvert:
    """A site's per-run X25519 public key, signed by its enrolled identity."""

    site_id: str
    run_id: str
    public_key: bytes
    signature: bytes = b""

    def signed_payload(self) -> bytes:
        """What the identity key signs."""
        return frame("advert", self.run_id, self.site_id, self.public_key)

    def to_bytes(self) -> bytes:
        """Encode (about 150 bytes)."""
        return _dump(
            "advert",
            {
                "site": self.site_id,
                "run": self.run_id,
                "pub": _b64(self.public_key),
                "sig": _b64(self.signature),
            },
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> KeyAdvert:
        """Decode; malformed input raises :class:`MalformedMessageError`."""
        return cls._from_dict(_load("advert", raw))

    @classmethod
    def _from_dict(cls, d: dict[str, Any]) -> KeyAdvert:
        try:
            return cls(str(d["site"]), str(d["run"]), _unb64(d["pub"]), _unb64(d["sig"]))
        except (KeyError, ValueError) as exc:
            raise MalformedMessageError(
                str(d.get("site", UNKNOWN)), f"key advert field missing or invalid: {exc}"
            ) from None


@dataclass(frozen=True)
class Roster:
    """All sites' key adverts for one run, in canonical (sorted site id) order."""

    run_id: str
    adverts: tuple[KeyAdvert, ...]

    @classmethod
    def of(cls, run_id: str, adverts: list[KeyAdvert] | tuple[KeyAdvert, ...]) -> Roster:
        """Build a roster, sorting the adverts canonically."""
        return cls(run_id, tuple(sorted(adverts, key=lambda a: a.site_id.encode())))

    @property
    def site_ids(self) -> tuple[str, ...]:
        """Site ids in canonical order."""
        return tuple(a.site_id for a in self.adverts)

    def to_bytes(self) -> bytes:
        """Encode (about 150 bytes per site)."""
        return _dump(
            "roster",
            {
                "run": self.run_id,
                "adverts": [json.loads(a.to_bytes()[len(MAGIC) :]) for a in self.adverts],
            },
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Roster:
        """Decode; malformed input raises :class:`MalformedMessageError`."""
        d = _load("roster", raw)
        adverts = d.get("adverts")
        if not isinstance(adverts, list):
            raise MalformedMessageError(UNKNOWN, "roster has no advert list")
        return cls.of(str(d.get("run", "")), [KeyAdvert._from_dict(a) for a in adverts])


@dataclass(frozen=True)
class MaskedUpdate:
    """One site's masked, weighted, quantized update for one round (its only message)."""

    run_id: str
    server_round: int
    site_id: str
    modulus_bits: int
    participants: tuple[str, ...]
    length: int  # the vector length the signed header states
    vector: np.ndarray = field(repr=False)
    shares: Mapping[str, bytes] = field(default_factory=dict, repr=False)  # strict mode
    digest: bytes = b""
    signature: bytes = b""

    def signed_payload(self) -> bytes:
        """What the identity key signs: ids, round, sizes and hashes of the payload."""
        return frame(
            "update",
            self.run_id,
            self.server_round,
            self.site_id,
            self.modulus_bits,
            frame(*self.participants),
            self.length,
            DIGEST,
            self.digest,
            _digest_map(self.shares),
        )

    def header(self) -> bytes:
        """The small signed header (goes in a ConfigRecord)."""
        return _dump(
            "update",
            {
                "run": self.run_id,
                "round": self.server_round,
                "site": self.site_id,
                "k": self.modulus_bits,
                "participants": list(self.participants),
                "length": self.length,
                "hash": DIGEST,
                "digest": _b64(self.digest),
                "shares": {k: _b64(v) for k, v in sorted(self.shares.items())},
                "sig": _b64(self.signature),
            },
        )

    def to_parts(self) -> tuple[bytes, np.ndarray]:
        """``(header, vector)``: header for a ConfigRecord, vector for an ArrayRecord."""
        return self.header(), self.vector

    @classmethod
    def from_parts(cls, header: bytes, vector: np.ndarray) -> MaskedUpdate:
        """Rebuild from :meth:`to_parts`; only decoding is checked here (the server verifies)."""
        d = _load("update", header)
        site = str(d.get("site", UNKNOWN))
        if d.get("hash") != DIGEST:
            raise MalformedMessageError(
                site,
                f"the update's vector is hashed by {d.get('hash', 'SHA-256 (no hash field)')!r}",
                expected=f"{DIGEST!r}, which this server checks",
                fix="run the same medfed version at the site as at the server",
            )
        try:
            k = int(d["k"])
            dtype = np.dtype("<u4" if k == 32 else "<u8")
            if k not in (32, 64):
                raise ValueError(f"modulus bits {k}")
            vec = np.asarray(vector)
            if vec.ndim != 1 or vec.dtype.kind != "u" or vec.dtype.itemsize != dtype.itemsize:
                raise ValueError(
                    f"vector dtype {vec.dtype} shape {vec.shape}, expected 1-D {dtype}"
                )
            shares = d["shares"]
            if not isinstance(shares, dict) or not isinstance(d["participants"], list):
                raise ValueError("shares/participants have the wrong type")
            return cls(
                str(d["run"]),
                int(d["round"]),
                site,
                k,
                tuple(str(p) for p in d["participants"]),
                int(d["length"]),
                vec.astype(dtype, copy=False),
                {str(p): _unb64(c) for p, c in shares.items()},
                _unb64(d["digest"]),
                _unb64(d["sig"]),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedMessageError(
                site, f"update header field missing or invalid: {exc}"
            ) from None

    def to_bytes(self) -> bytes:
        """One blob: 8-byte header length, header, raw vector bytes."""
        head = self.header()
        return struct.pack(">Q", len(head)) + head + np.ascontiguousarray(self.vector).tobytes()

    @classmethod
    def from_bytes(cls, raw: bytes) -> MaskedUpdate:
        """Inverse of :meth:`to_bytes` (a truncated tail decodes; the server rejects it)."""
        raw = bytes(raw)
        if len(raw) < 8:
            raise MalformedMessageError(UNKNOWN, "update shorter than its length prefix")
        (hlen,) = struct.unpack(">Q", raw[:8])
        if 8 + hlen > len(raw):
            raise MalformedMessageError(UNKNOWN, "update header truncated")
        head = raw[8 : 8 + hlen]
        d = _load("update", head)
        item = 4 if d.get("k") == 32 else 8
        body = raw[8 + hlen :]
        body = body[: len(body) - len(body) % item]
        return cls.from_parts(head, np.frombuffer(body, dtype=f"<u{item}"))


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> one survivor, after the deadline: who survived, who dropped, relayed shares."""

    run_id: str
    server_round: int
    site_id: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    shares: Mapping[str, bytes] = field(default_factory=dict, repr=False)

    def to_bytes(self) -> bytes:
        """Encode (strict mode: ~100 bytes per survivor)."""
        return _dump(
            "unmask",
            {
                "run": self.run_id,
                "round": self.server_round,
                "site": self.site_id,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "shares": {k: _b64(v) for k, v in sorted(self.shares.items())},
            },
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> UnmaskRequest:
        """Decode; malformed input raises :class:`MalformedMessageError`."""
        d = _load("unmask", raw)
        try:
            return cls(
                str(d["run"]),
                int(d["round"]),
                str(d["site"]),
                tuple(str(s) for s in d["survivors"]),
                tuple(str(s) for s in d["dropped"]),
                {str(k): _unb64(v) for k, v in d["shares"].items()},
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise MalformedMessageError(
                str(d.get("site", UNKNOWN)), f"unmask request invalid: {exc}"
            ) from None


@dataclass(frozen=True)
class Reveal:
    """A survivor's answer: round mask seeds with dropped sites, self-mask shares of survivors."""

    run_id: str
    server_round: int
    site_id: str
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    seeds: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    b_shares: Mapping[str, bytes] = field(default_factory=dict, repr=False)
    signature: bytes = b""

    def signed_payload(self) -> bytes:
        """What the identity key signs."""
        return frame(
            "reveal",
            self.run_id,
            self.server_round,
            self.site_id,
            frame(*self.survivors),
            frame(*self.dropped),
            _digest_map(self.seeds),
            _digest_map(self.b_shares),
        )

    def to_bytes(self) -> bytes:
        """Encode (~60 bytes per dropped site, ~100 per survivor in strict mode)."""
        return _dump(
            "reveal",
            {
                "run": self.run_id,
                "round": self.server_round,
                "site": self.site_id,
                "survivors": list(self.survivors),
                "dropped": list(self.dropped),
                "seeds": {k: _b64(v) for k, v in sorted(self.seeds.items())},
                "b_shares": {k: _b64(v) for k, v in sorted(self.b_shares.items())},
                "sig": _b64(self.signature),
            },
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Reveal:
        """Decode; malformed input raises :class:`MalformedMessageError`."""
        d = _load("reveal", raw)
        try:
            return cls(
                str(d["run"]),
                int(d["round"]),
                str(d["site"]),
                tuple(str(s) for s in d["survivors"]),
                tuple(str(s) for s in d["dropped"]),
                {str(k): _unb64(v) for k, v in d["seeds"].items()},
                {str(k): _unb64(v) for k, v in d["b_shares"].items()},
                _unb64(d["sig"]),
            )
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise MalformedMessageError(
                str(d.get("site", UNKNOWN)), f"reveal invalid: {exc}"
            ) from None
