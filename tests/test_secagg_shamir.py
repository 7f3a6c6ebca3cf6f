"""Shamir sharing over GF(2**521 - 1)."""

from __future__ import annotations

import itertools

import pytest

from medfed.core.secagg import RecoveryError
from medfed.core.secagg.shamir import SHARE_BYTES, combine, split


def test_any_t_shares_rebuild_the_secret() -> None:
    secret = bytes(range(32))
    shares = split(secret, 3, [1, 2, 3, 4, 5])
    assert all(len(s) == SHARE_BYTES for s in shares.values())
    for subset in itertools.combinations(shares.values(), 3):
        assert combine(list(subset), 3, 32) == secret


def test_fewer_than_t_fails_clearly() -> None:
    shares = split(b"\x01" * 32, 3, [1, 2, 3, 4])
    with pytest.raises(RecoveryError, match="only 2 shares .* threshold is 3"):
        combine([shares[1], shares[2]], 3, 32)


def test_altered_extra_share_is_detected() -> None:
    shares = split(b"\x07" * 32, 2, [1, 2, 3])
    bad = bytearray(shares[3])
    bad[-1] ^= 1
    with pytest.raises(RecoveryError, match="inconsistent"):
        combine([shares[1], shares[2], bytes(bad)], 2, 32)


def test_shares_are_fresh_randomness() -> None:
    a = split(b"\x00" * 32, 2, [1, 2])
    b = split(b"\x00" * 32, 2, [1, 2])
    assert a[1] != b[1]  # the polynomial is fresh (P(collision) = 2**-521)
