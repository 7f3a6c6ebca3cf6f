"""Fixed-point encoding: the documented error bound, overflow headroom, fail-closed inputs."""

from __future__ import annotations

import numpy as np
import pytest

from medfed.core.secagg import InputError, SecAggConfig, SecAggConfigError
from medfed.core.secagg.config import FixedPoint
from medfed.core.secagg.quantize import CHUNK, decode_sum, encode, error_bound, quantize_weight


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
    enc = [
        encode(x, w, fp, rounding=cfg.rounding, rng=np.random.default_rng(i))[0]
        for i, (x, w) in enumerate(zip(xs, ws, strict=True))
    ]
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


def _numpy_encode(
    x: np.ndarray, weight: float, fp: FixedPoint, rounding: str, rng: np.random.Generator | None
) -> tuple[np.ndarray, int]:
    """The encoding spelled out in numpy, one pass per step (the reference)."""
    wq = quantize_weight(weight, fp)
    v = x.astype(np.float64)
    clipped = int(np.count_nonzero(np.abs(v) > fp.clip_range))
    v = np.clip(v, -fp.clip_range, fp.clip_range) * (wq / fp.weight_scale * fp.scale)
    if rounding == "stochastic":
        assert rng is not None
        noise = np.concatenate(
            [rng.random(min(CHUNK, v.size - s)) for s in range(0, v.size, CHUNK)]
        )
        v = np.floor(v + noise)
    else:
        v = np.rint(v)
    out = v.astype(np.int64).astype(fp.dtype)  # wraps mod 2**k
    return np.append(out, np.array(wq, dtype=fp.dtype)), clipped


@pytest.mark.parametrize("bits", [32, 64])
@pytest.mark.parametrize("rounding", ["deterministic", "stochastic"])
def test_encoding_and_decoding_equal_the_numpy_reference_bit_for_bit(
    bits: int, rounding: str
) -> None:
    cfg = SecAggConfig(modulus_bits=bits, rounding=rounding, clip_range=0.3)  # type: ignore[arg-type]
    fp = FixedPoint.of(cfg, 5)
    rng = np.random.default_rng(11)
    d = CHUNK + 1234  # a partial last chunk
    x = (rng.standard_normal(d) * 0.2).astype(np.float32)
    x[:6] = [0.3, -0.3, 7.0, -7.0, 0.0, np.float32(0.3).item()]  # at and beyond the clip
    for weight in (1.0, 37.0, fp.max_weight):
        got, got_clipped = encode(
            x, weight, fp, rounding=cfg.rounding, rng=np.random.default_rng(5)
        )
        want, want_clipped = _numpy_encode(x, weight, fp, cfg.rounding, np.random.default_rng(5))
        assert got.dtype == want.dtype and got_clipped == want_clipped
        np.testing.assert_array_equal(got, want)
    total = _sum([encode(x, w, fp)[0] for w in (3.0, 500.0)], fp)
    s = total.view(fp.signed_dtype)
    w_norm = int(s[-1]) / fp.weight_scale
    want_mean = (s[:-1].astype(np.float64) * (1.0 / (fp.scale * w_norm))).astype(np.float32)
    mean, _ = decode_sum(total, fp)
    np.testing.assert_array_equal(mean, want_mean)
