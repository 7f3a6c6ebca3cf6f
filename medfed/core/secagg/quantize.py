"""Fixed-point encoding of a weighted update, and decoding of a sum (pure functions).

Error bound (per coordinate of the weighted mean, proven in docs/secure-aggregation.md):
with ``n`` summed sites, total quantized weight ``W`` (same unit as the weights) and
``rho = 0.5`` (deterministic) or ``1`` (stochastic) units per site,

    |mean_recovered - mean_exact| <= n * (rho + 2**-12) * M / (S * W) + 2**-23 * c

where ``mean_exact = sum(w_i * clip(x_i)) / sum(w_i)`` with the quantized weights
``w_i`` (equal to the given ones for integer counts up to ``M``).
"""

from __future__ import annotations

import math

import numpy as np

from medfed.core.secagg.config import FLOAT_SLACK_UNITS, FixedPoint, Rounding
from medfed.core.secagg.errors import InputError

CHUNK = 1 << 18  # elements per pass: keeps the working set in L2


def quantize_weight(weight: float, fp: FixedPoint) -> int:
    """The weight as an integer in units of ``M / Sw`` (deterministic rounding)."""
    w = float(weight)
    if not math.isfinite(w) or w < 0 or w > fp.max_weight:
        raise InputError(
            f"weight {weight!r} is out of range",
            expected=f"a finite number in [0, {fp.max_weight:g}] (max_weight, rounded up to 2^k)",
            fix="raise max_weight in the run's secure-aggregation settings",
        )
    return int(round(w / fp.max_weight * fp.weight_scale))


def encode(
    vector: np.ndarray,
    weight: float,
    fp: FixedPoint,
    *,
    rounding: Rounding = "deterministic",
    rng: np.random.Generator | None = None,
) -> tuple[np.ndarray, int]:
    """Encode ``weight * clip(vector)`` and the weight as ``d + 1`` integers mod ``2**k``.

    Returns the encoded vector (``fp.dtype``) and the number of clipped coordinates.
    ``rng`` drives stochastic rounding only (a fresh OS-seeded one when omitted).
    """
    x = np.asarray(vector)
    if x.ndim != 1 or x.dtype.kind != "f":
        raise InputError(
            f"the update must be one flat float vector, got dtype {x.dtype} shape {x.shape}",
            fix="pack the model state with medfed.core.packing.pack",
        )
    wq = quantize_weight(weight, fp)
    factor = np.float64(wq / fp.weight_scale * fp.scale)  # exact: dyadic times power of two
    c = np.float64(fp.clip_range)
    if rounding == "stochastic" and rng is None:
        rng = np.random.default_rng()
    out = np.empty(x.size + 1, dtype=fp.dtype)
    tmp = np.empty(min(CHUNK, max(x.size, 1)), dtype=np.float64)
    noise = np.empty_like(tmp) if rounding == "stochastic" else None
    ints = np.empty(tmp.size, dtype=np.int64)
    clipped = 0
    for start in range(0, x.size, CHUNK):
        m = min(CHUNK, x.size - start)
        v = tmp[:m]
        np.copyto(v, x[start : start + m])  # float64, exact
        if not np.isfinite(v).all():
            bad = start + int(np.flatnonzero(~np.isfinite(v))[0])
            raise InputError(
                f"the update holds a non-finite value at index {bad}",
                fix="check local training (diverged loss?) before secure aggregation",
            )
        clipped += int(np.count_nonzero(np.abs(v) > c))
        np.clip(v, -c, c, out=v)
        np.multiply(v, factor, out=v)
        if noise is not None:
            assert rng is not None
            rng.random(out=noise[:m])
            np.add(v, noise[:m], out=v)
            np.floor(v, out=v)
        else:
            np.rint(v, out=v)
        np.copyto(ints[:m], v, casting="unsafe")  # integral values, |v| <= 2**40: exact
        np.copyto(out[start : start + m], ints[:m], casting="unsafe")  # wraps mod 2**k
    out[-1] = wq
    return out, clipped


def signed(total: np.ndarray, fp: FixedPoint) -> np.ndarray:
    """The two's-complement reading of a sum mod ``2**k`` (a view, no copy)."""
    return total.view(fp.signed_dtype)


def decode_sum(total: np.ndarray, fp: FixedPoint) -> tuple[np.ndarray, float]:
    """Weighted mean (float32, length ``d``) and total weight from the unmasked sum."""
    s = signed(np.asarray(total, dtype=fp.dtype), fp)
    wsum = int(s[-1])
    if wsum <= 0:
        raise InputError(
            "the surviving sites' total weight is zero; there is nothing to average",
            fix="check that sites report their example counts",
        )
    w_norm = wsum / fp.weight_scale  # sum of w_i / M
    mean = np.empty(s.size - 1, dtype=np.float32)
    tmp = np.empty(min(CHUNK, max(mean.size, 1)), dtype=np.float64)
    inv = np.float64(1.0 / (fp.scale * w_norm))
    for start in range(0, mean.size, CHUNK):
        m = min(CHUNK, mean.size - start)
        np.copyto(tmp[:m], s[start : start + m])
        np.multiply(tmp[:m], inv, out=tmp[:m])
        np.copyto(mean[start : start + m], tmp[:m], casting="same_kind")
    return mean, w_norm * fp.max_weight


def error_bound(fp: FixedPoint, n_summed: int, total_weight: float, rounding: Rounding) -> float:
    """Worst-case absolute error of each coordinate of the recovered weighted mean."""
    rho = 0.5 if rounding == "deterministic" else 1.0
    w_norm = total_weight / fp.max_weight
    return n_summed * (rho + FLOAT_SLACK_UNITS) / (fp.scale * w_norm) + 2.0**-23 * fp.clip_range
