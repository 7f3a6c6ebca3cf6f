"""Key derivation (HKDF-SHA256) and mask expansion (ChaCha20 keystream) for secure aggregation.

Every derived key carries its purpose, the run id, the round and both site ids in the
HKDF ``info`` (length-prefixed, so no two contexts encode alike). A mask is the
ChaCha20 keystream of a 32-byte key that is used for exactly one (pair or site,
round, purpose), with the all-zero nonce, read as little-endian uint32/uint64: each
word is uniform mod ``2**k``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"medfed-secagg/v1"
SEED_BYTES = 32
CHUNK_BYTES = 1 << 20  # keystream generated per call: cache-resident
_NONCE = bytes(16)  # ChaCha20: 4-byte counter + 12-byte nonce, all zero (keys are single-use)


def frame(*parts: bytes | str | int) -> bytes:
    """Unambiguous concatenation: each part length-prefixed (ints as 8-byte big-endian)."""
    out = bytearray()
    for part in parts:
        if isinstance(part, int):
            raw = struct.pack(">q", part)
        elif isinstance(part, str):
            raw = part.encode("utf-8")
        else:
            raw = bytes(part)
        out += struct.pack(">I", len(raw)) + raw
    return bytes(out)


def hkdf(secret: bytes, *info: bytes | str | int, length: int = SEED_BYTES) -> bytes:
    """HKDF-SHA256 of ``secret`` with a framed ``info`` prefixed by the protocol label."""
    return HKDF(
        algorithm=hashes.SHA256(), length=length, salt=None, info=frame(PROTOCOL, *info)
    ).derive(secret)


def ordered(a: str, b: str) -> tuple[str, str]:
    """The canonical order of two site ids (by their UTF-8 bytes)."""
    return (a, b) if a.encode() < b.encode() else (b, a)


def pair_secret(shared: bytes, run_id: str, a: str, pub_a: bytes, b: str, pub_b: bytes) -> bytes:
    """The per-run secret of a pair from their X25519 output (symmetric in a, b)."""
    if a.encode() > b.encode():
        a, pub_a, b, pub_b = b, pub_b, a, pub_a
    return hkdf(shared, "pair", run_id, a, b, pub_a, pub_b)


def round_mask_seed(pair: bytes, run_id: str, server_round: int, a: str, b: str) -> bytes:
    """The pair's mask key for one round: the only thing revealed when a peer drops."""
    lo, hi = ordered(a, b)
    return hkdf(pair, "mask", run_id, server_round, lo, hi)


def share_key(pair: bytes, run_id: str, server_round: int, sender: str, receiver: str) -> bytes:
    """AEAD key for the self-mask share ``sender`` deals to ``receiver`` in one round."""
    return hkdf(pair, "share", run_id, server_round, sender, receiver)


def self_mask_key(seed: bytes, run_id: str, server_round: int, site: str) -> bytes:
    """Expansion key of a site's self-mask seed (strict mode)."""
    return hkdf(seed, "self", run_id, server_round, site)


def mask_sign(me: str, other: str) -> int:
    """+1 if ``me`` precedes ``other`` in the canonical order (adds the mask), else -1."""
    return 1 if me.encode() < other.encode() else -1


def apply_masks(acc: np.ndarray, terms: Iterable[tuple[bytes, int]]) -> None:
    """In place: ``acc += sign * PRG(key)`` mod ``2**k`` for each ``(key, sign)`` in ``terms``.

    ``acc`` is a contiguous uint32 or uint64 vector; unsigned numpy arithmetic wraps,
    which is exactly arithmetic mod ``2**k``. One pass over ``acc`` in cache-sized
    chunks, every keystream generated chunk by chunk (no full-length temporaries).
    """
    if acc.dtype.kind != "u" or not acc.flags.c_contiguous or acc.ndim != 1:
        raise TypeError("apply_masks needs a contiguous 1-D unsigned vector")
    streams: Sequence[tuple[object, int]] = [
        (Cipher(algorithms.ChaCha20(key, _NONCE), mode=None).encryptor(), sign)
        for key, sign in terms
    ]
    if not streams:
        return
    item = acc.dtype.itemsize
    per = CHUNK_BYTES // item
    zeros = memoryview(bytes(per * item))
    buf = bytearray(per * item)
    ks_all = np.frombuffer(buf, dtype=acc.dtype)
    for start in range(0, acc.size, per):
        m = min(per, acc.size - start)
        seg = acc[start : start + m]
        ks = ks_all[:m]
        for enc, sign in streams:
            enc.update_into(zeros[: m * item], buf)  # type: ignore[attr-defined]
            if sign > 0:
                np.add(seg, ks, out=seg)
            else:
                np.subtract(seg, ks, out=seg)


def expand(key: bytes, size: int, dtype: str) -> np.ndarray:
    """The mask of ``key`` alone, as a vector (tests and audits; masking uses apply_masks)."""
    out = np.zeros(size, dtype=dtype)
    apply_masks(out, [(key, 1)])
    return out
