"""What the server holds for one site looks like uniform noise, uncorrelated with the update."""

from __future__ import annotations

import numpy as np
import pytest
from secagg_builders import federation

D = 4096
ROUNDS = 40


@pytest.mark.parametrize("bits", [32, 64])
def test_masked_update_is_uncorrelated_with_the_true_update(bits: int) -> None:
    fed = federation(3, size=D, modulus_bits=bits, seed=11)
    sess = fed.sessions["site-b"]
    x = np.linspace(-1, 1, D, dtype=np.float32)  # a strongly structured update
    corrs = []
    for rnd in range(1, ROUNDS + 1):
        y = sess.mask_update(rnd, x, 500.0).vector[:-1].astype(np.float64)
        corrs.append(np.corrcoef(y, x)[0, 1])
    corrs = np.array(corrs)
    # Under independence each corr ~ N(0, 1/D): |corr| < 5 sigma, the mean < 5 sigma / sqrt(R)
    assert np.abs(corrs).max() < 5 / np.sqrt(D)
    assert abs(corrs.mean()) < 5 / np.sqrt(D * ROUNDS)


def test_masked_values_are_uniform_mod_2k() -> None:
    fed = federation(3, size=D, seed=12)
    sess = fed.sessions["site-a"]
    x = np.zeros(D, np.float32)  # the easiest update to spot if masking failed
    values = np.concatenate([sess.mask_update(r, x, 1.0).vector for r in range(1, ROUNDS + 1)])
    buckets = np.bincount((values >> np.uint32(28)).astype(np.int64), minlength=16)  # top 4 bits
    expected = values.size / 16
    chi2 = float(((buckets - expected) ** 2 / expected).sum())
    assert chi2 < 50.0  # 15 degrees of freedom: P(chi2 > 50) ~ 1e-5
    low = np.bincount((values & np.uint32(15)).astype(np.int64), minlength=16)  # low 4 bits
    assert float(((low - expected) ** 2 / expected).sum()) < 50.0


def test_same_update_two_sites_look_unrelated() -> None:
    fed = federation(3, size=D, seed=13)
    x = np.full(D, 0.25, np.float32)
    ya = fed.sessions["site-a"].mask_update(1, x, 7.0).vector[:-1].astype(np.float64)
    yb = fed.sessions["site-b"].mask_update(1, x, 7.0).vector[:-1].astype(np.float64)
    assert abs(np.corrcoef(ya, yb)[0, 1]) < 5 / np.sqrt(D)
