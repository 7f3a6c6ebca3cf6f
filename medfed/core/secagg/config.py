"""Secure-aggregation settings and the fixed-point encoding they imply.

The encoding (pure functions in :mod:`medfed.core.secagg.quantize`) maps a site's
update ``x`` (float32, length ``d``) and weight ``w`` (example count) to
``d + 1`` integers mod ``2**k``:

- ``wq = round(w / M * Sw)``: the weight, quantized first (deterministic); ``M``
  is ``max_weight`` rounded up to a power of two, ``Sw = 2**ew`` the largest power
  of two with ``n * Sw <= 2**(k-1) - 1``. Integer counts ``w <= M`` are exact.
- ``q_j = R(wq / Sw * clip(x_j, -c, c) * S)``: the weighted coordinate, ``S = 2**e``
  the largest power of two with ``n * ceil(c * S) <= 2**(k-1) - 1`` and
  ``c * S <= 2**40`` (so float64 products carry < 2**-12 units of error).

The server's sum of ``n`` sites never leaves ``(-2**(k-1), 2**(k-1))``, so the
signed value is read back exactly, and the weighted mean is
``sum(q) / S / (sum(wq) / Sw)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from medfed.core.secagg.errors import SecAggError

Mode = Literal["default", "strict"]
Rounding = Literal["deterministic", "stochastic"]

MAX_PRODUCT = 2.0**40  # |w * x * S| stays below this: float64 keeps it within 2**-12 of exact
FLOAT_SLACK_UNITS = 2.0**-12


class SecAggConfigError(SecAggError):
    """A secure-aggregation setting is out of range."""


@dataclass(frozen=True, kw_only=True)
class SecAggConfig:
    """Settings shared by every site and the server for one run.

    Parameters
    ----------
    mode : {"default", "strict"}
        ``"default"``: pairwise masks only; dropouts cost one reveal message.
        ``"strict"``: pairwise masks plus a Shamir-shared self-mask per site and
        round (double masking); every round costs one unmasking message.
    threshold : int, optional
        ``t``: Shamir shares needed to rebuild a self-mask seed (strict mode), so up
        to ``t - 1`` colluding sites learn nothing from their shares. A round is
        unmasked only with at least ``t + 1`` survivors (both modes). Default:
        ``ceil((n - 1) / 2)`` for ``n`` sites, at least 1.
    clip_range : float
        ``c``: each coordinate is clipped to ``[-c, c]`` before encoding.
    modulus_bits : {32, 64}
        ``k``: arithmetic mod ``2**k``; the masked vector is uint32 (same bytes as
        float32) or uint64.
    max_weight : float
        Largest weight (example count) a site may report; rounded up to a power of two.
    rounding : {"deterministic", "stochastic"}
        Round to nearest (error <= 0.5 unit) or unbiased stochastic rounding (< 1 unit).
    """

    mode: Mode = "default"
    threshold: int | None = None
    clip_range: float = 1.0
    modulus_bits: int = 32
    max_weight: float = 65536.0
    rounding: Rounding = "deterministic"

    def __post_init__(self) -> None:
        if self.mode not in ("default", "strict"):
            raise SecAggConfigError(
                f"unknown secure-aggregation mode {self.mode!r}",
                expected="'default' or 'strict'",
            )
        if self.modulus_bits not in (32, 64):
            raise SecAggConfigError(
                f"modulus_bits={self.modulus_bits} is not supported", expected="32 or 64"
            )
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise SecAggConfigError(
                f"clip_range={self.clip_range} must be a positive finite number",
                expected="e.g. 1.0 for weight deltas",
            )
        if not (math.isfinite(self.max_weight) and self.max_weight >= 1):
            raise SecAggConfigError(
                f"max_weight={self.max_weight} must be a finite number >= 1",
                expected="the largest example count a site may report, e.g. 65536",
            )
        if self.rounding not in ("deterministic", "stochastic"):
            raise SecAggConfigError(
                f"unknown rounding {self.rounding!r}", expected="'deterministic' or 'stochastic'"
            )
        if self.threshold is not None and self.threshold < 1:
            raise SecAggConfigError(
                f"threshold={self.threshold} must be at least 1", expected="1 <= t <= n - 1"
            )

    def resolved_threshold(self, n_sites: int) -> int:
        """The threshold ``t`` for a roster of ``n_sites`` (checked: ``1 <= t <= n - 1``)."""
        t = self.threshold if self.threshold is not None else max(1, math.ceil((n_sites - 1) / 2))
        if n_sites < 2:
            raise SecAggConfigError(
                f"secure aggregation needs at least 2 sites, the roster has {n_sites}",
                fix="enrol more sites or run with secure aggregation off (debugging only)",
            )
        if not 1 <= t <= n_sites - 1:
            raise SecAggConfigError(
                f"threshold={t} is out of range for {n_sites} sites",
                expected=f"1 <= threshold <= {n_sites - 1}",
            )
        return t

    def to_dict(self) -> dict[str, object]:
        """JSON-ready form (rides in the round-1 request; both sides must agree)."""
        return {
            "mode": self.mode,
            "threshold": self.threshold,
            "clip_range": self.clip_range,
            "modulus_bits": self.modulus_bits,
            "max_weight": self.max_weight,
            "rounding": self.rounding,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> SecAggConfig:
        """Inverse of :meth:`to_dict`; unknown keys are an error."""
        known = {"mode", "threshold", "clip_range", "modulus_bits", "max_weight", "rounding"}
        extra = set(data) - known
        if extra:
            raise SecAggConfigError(
                f"unknown secure-aggregation settings {sorted(extra)}", expected=str(sorted(known))
            )
        return cls(**data)  # type: ignore[arg-type]


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point scales for ``n_sites`` sites under a config (see module docstring)."""

    modulus_bits: int
    n_sites: int
    clip_range: float
    scale_exp: int  # e: S = 2**e
    weight_exp: int  # ew: Sw = 2**ew
    max_weight: float  # M, a power of two

    @classmethod
    def of(cls, config: SecAggConfig, n_sites: int) -> FixedPoint:
        """Derive the largest scales whose sum over ``n_sites`` cannot overflow."""
        k, c = config.modulus_bits, config.clip_range
        limit = 2 ** (k - 1) - 1
        max_weight = float(2 ** math.ceil(math.log2(config.max_weight)))
        weight_exp = math.floor(math.log2(limit / n_sites))
        while n_sites * 2**weight_exp > limit:
            weight_exp -= 1
        e = 62
        while e > -1074 and (n_sites * math.ceil(c * 2.0**e) > limit or c * 2.0**e > MAX_PRODUCT):
            e -= 1
        if weight_exp < 0 or n_sites * math.ceil(c * 2.0**e) > limit or c * 2.0**e < 1:
            raise SecAggConfigError(
                f"{n_sites} sites do not fit a {k}-bit modulus with clip_range={c}",
                fix="use modulus_bits=64 or fewer sites",
            )
        return cls(k, n_sites, c, e, weight_exp, max_weight)

    @property
    def scale(self) -> float:
        """``S``: integer units per unit of (normalized weight x value)."""
        return 2.0**self.scale_exp

    @property
    def weight_scale(self) -> float:
        """``Sw``: integer units per unit of normalized weight."""
        return 2.0**self.weight_exp

    @property
    def dtype(self) -> str:
        """The numpy dtype of masked vectors (little-endian unsigned)."""
        return "<u4" if self.modulus_bits == 32 else "<u8"

    @property
    def signed_dtype(self) -> str:
        """The signed view of a sum (two's complement)."""
        return "<i4" if self.modulus_bits == 32 else "<i8"
