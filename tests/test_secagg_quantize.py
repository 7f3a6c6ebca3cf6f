"""Fixed-point encoding: the documented error bound, overflow headroom, fail-closed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.core.secagg import InputError, SecAggConfig, SecAggConfigError
from medfed.core.secagg.config import FixedPoint
from medfed.core.secagg.quantize import decode_sum, encode, error_bound


def _sum(encoded: list[np.ndarray], fp: FixedPoint) -> np.ndarray:
    total = np.zeros_like(encoded[0])
    for e in encoded:
        np.add(total, e, out=total)
    return total


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
@pytest.mark.parametrize("clip", [1.0, 0.05, 30.0])
def test_weighted_mean_within_bound(bits: int, rounding: str, clip: float) -> None:
    n, d = 7, 5000
    cfg = SecAggConfig(modulus_bits=bits, rounding=rounding, clip_range=clip)  # type: ignore[arg-type]
    fp = FixedPoint.of(cfg, n)
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-1.2 * clip, 1.2 * clip, d).astype(np.float32) for _ in range(n)]
    ws = [float(w) for w in rng.integers(1, 3000, n)]
    enc = [encode(x, w, fp, rounding=cfg.rounding, rng=np.random.default_rng(i))[0]
           for i, (x, w) in enumerate(zip(xs, ws, strict=True))]
    mean, total = decode_sum(_sum(enc, fp), fp)
    exact = sum(w * np.clip(x.astype(np.float64), -clip, clip) for x, w in zip(xs, ws, strict=True))
    exact /= sum(ws)
    assert total == sum(ws)  # integer counts are exact
    bound = error_bound(fp, n, total, cfg.rounding)
    err = np.abs(mean.astype(np.float64) - exact).max()
    assert err <= bound, (err, bound)
    assert bound < 1e-4 * clip  # and the bound is useful, not vacuous


def test_bound_is_tight_for_small_weights_in_32_bits() -> None:
    # one example per site, max_weight 2**16: the worst precision the defaults allow
    fp = FixedPoint.of(SecAggConfig(), 10)
    assert error_bound(fp, 10, 10.0, "deterministic") < 5e-4


def test_sum_of_extremes_does_not_overflow() -> None:
    for bits in (32, 64):
        cfg = SecAggConfig(modulus_bits=bits, clip_range=2.0, max_weight=1000)
        n = 50
        fp = FixedPoint.of(cfg, n)
        top = [encode(np.full(3, 9.0, np.float32), fp.max_weight, fp)[0] for _ in range(n)]
        bottom = [encode(np.full(3, -9.0, np.float32), fp.max_weight, fp)[0] for _ in range(n)]
        assert np.allclose(decode_sum(_sum(top, fp), fp)[0], 2.0)
        assert np.allclose(decode_sum(_sum(bottom, fp), fp)[0], -2.0)


def test_stochastic_rounding_is_unbiased() -> None:
    cfg = SecAggConfig(rounding="stochastic", clip_range=1.0)
    fp = FixedPoint.of(cfg, 2)
    x = np.full(200_000, 0.3 / fp.scale * fp.max_weight, dtype=np.float32)  # 0.3 of a unit
    q = encode(x, 1.0, fp, rounding="stochastic", rng=np.random.default_rng(0))[0]
    frac = q[:-1].astype(np.float64).mean()
    assert abs(frac - 0.3) < 0.01


def test_counts_clipped_coordinates() -> None:
    fp = FixedPoint.of(SecAggConfig(clip_range=1.0), 3)
    _, clipped = encode(np.array([0.5, 1.5, -3.0, 1.0], np.float32), 1.0, fp)
    assert clipped == 2


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_update_fails_closed(bad: float) -> None:
    fp = FixedPoint.of(SecAggConfig(), 3)
    with pytest.raises(InputError, match="non-finite value at index 2"):
        encode(np.array([0.0, 1.0, bad], np.float32), 1.0, fp)


@pytest.mark.parametrize("weight", [-1.0, float("nan"), 1e9])
def test_weight_out_of_range_fails_closed(weight: float) -> None:
    fp = FixedPoint.of(SecAggConfig(), 3)
    with pytest.raises(InputError, match="weight"):
        encode(np.zeros(3, np.float32), weight, fp)


def test_config_rejects_bad_values() -> None:
    with pytest.raises(SecAggConfigError, match="modulus_bits"):
        SecAggConfig(modulus_bits=16)
    with pytest.raises(SecAggConfigError, match="mode"):
        SecAggConfig(mode="paranoid")  # type: ignore[arg-type]
    with pytest.raises(SecAggConfigError, match="threshold"):
        SecAggConfig(threshold=5).resolved_threshold(4)
    with pytest.raises(SecAggConfigError, match="do not fit"):
        FixedPoint.of(SecAggConfig(), 2**31)  # more sites than a 32-bit sum can hold
    assert SecAggConfig.from_dict(SecAggConfig(mode="strict").to_dict()).mode == "strict"
