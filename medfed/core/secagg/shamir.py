"""Shamir secret sharing over the prime field GF(2**521 - 1).

Why not Flower's ``flwr.common.secure_aggregation.crypto.shamir``: it needs
PyCryptodome (not a medfed dependency, not installed), pads the secret into
independent 16-byte GF(2**128) chunks and spawns a thread pool per call. This is
the textbook scheme in a few lines: coefficients from ``secrets`` (the OS CSPRNG),
a Mersenne prime larger than any 64-byte secret, evaluation points ``x >= 1`` (the
dealer's roster positions of the receivers), Lagrange interpolation at 0, and a
consistency check when more than ``t`` shares are offered.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence

from medfed.core.secagg.errors import RecoveryError

PRIME = 2**521 - 1
SHARE_BYTES = 2 + 66  # 2-byte x, 66-byte y


def split(secret: bytes, threshold: int, xs: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` (<= 64 bytes) at points ``xs``; any ``threshold`` rebuild it."""
    if len(secret) > 64:
        raise ValueError("secret longer than 64 bytes")
    if not 1 <= threshold <= len(xs) or len(set(xs)) != len(xs) or min(xs) < 1:
        raise ValueError(f"need 1 <= threshold <= {len(xs)} distinct points >= 1")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    out: dict[int, bytes] = {}
    for x in xs:
        y = 0
        for a in reversed(coeffs):
            y = (y * x + a) % PRIME
        out[x] = x.to_bytes(2, "big") + y.to_bytes(66, "big")
    return out


def parse(share: bytes) -> tuple[int, int]:
    """``(x, y)`` of an encoded share."""
    if len(share) != SHARE_BYTES:
        raise RecoveryError(f"a Shamir share has {len(share)} bytes", expected=f"{SHARE_BYTES}")
    x, y = int.from_bytes(share[:2], "big"), int.from_bytes(share[2:], "big")
    if x < 1 or y >= PRIME:
        raise RecoveryError("a Shamir share is out of the field", expected="x >= 1, y < 2**521-1")
    return x, y


def _interpolate(points: Sequence[tuple[int, int]], at: int) -> int:
    total = 0
    for i, (xi, yi) in enumerate(points):
        num, den = 1, 1
        for j, (xj, _) in enumerate(points):
            if i != j:
                num = num * (at - xj) % PRIME
                den = den * (xi - xj) % PRIME
        total = (total + yi * num * pow(den, -1, PRIME)) % PRIME
    return total


def combine(
    shares: Mapping[str, bytes] | Sequence[bytes],
    threshold: int,
    length: int,
    *,
    what: str = "a secret",
) -> bytes:
    """Rebuild a ``length``-byte secret from at least ``threshold`` shares.

    Extra shares are checked against the polynomial through the first ``threshold``:
    a share that disagrees raises :class:`RecoveryError`.
    """
    raw = list(shares.values()) if isinstance(shares, Mapping) else list(shares)
    points = sorted({parse(s) for s in raw})
    if len({x for x, _ in points}) != len(points):
        raise RecoveryError(f"conflicting Shamir shares for {what} (same point, two values)")
    if len(points) < threshold:
        raise RecoveryError(
            f"only {len(points)} shares of {what}, the threshold is {threshold}",
            expected=f"at least {threshold} surviving sites revealing their shares",
        )
    base = points[:threshold]
    for x, y in points[threshold:]:
        if _interpolate(base, x) != y:
            raise RecoveryError(f"the shares of {what} are inconsistent (a share was altered)")
    value = _interpolate(base, 0)
    if value >= 1 << (8 * length):
        raise RecoveryError(f"the shares of {what} do not rebuild a {length}-byte secret")
    return value.to_bytes(length, "big")
