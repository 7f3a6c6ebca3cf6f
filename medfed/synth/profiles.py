"""Scanner profiles: how one site's scanner turns anatomy into pixel values."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from medfed.core.errors import MedfedError

#: Labels written to the label volumes, in value order.
LABEL_NAMES: tuple[str, ...] = ("background", "csf", "gm", "wm")


@dataclass(frozen=True, kw_only=True)
class ScannerProfile:
    """One site's simulated scanner.

    Parameters
    ----------
    name : str
        Short identifier written to the manifests and DICOM SeriesDescription.
    contrast : str
        ``"T1w"`` or ``"T2w"``; T2w flips the template texture and makes CSF bright.
    tissue_means : tuple of float
        Mean intensity of (CSF, GM, WM) before the contrast curve, on a 0-1 scale.
    texture_gain : float
        How much of the real template's within-tissue texture is kept (0 = flat tissues).
    gamma : float
        Contrast curve exponent applied to the 0-1 intensities (``I ** gamma``).
    bias_strength : float
        Standard deviation of the log of the smooth multiplicative bias field.
    noise : float
        Rician noise sigma as a fraction of the brightest tissue mean.
    in_plane_mm : float
        Pixel spacing (square pixels).
    slice_spacing_mm : float
        Distance between slice centres (DICOM SpacingBetweenSlices).
    slice_thickness_mm : float
        Slice profile FWHM (DICOM SliceThickness); a gap when smaller than the spacing.
    gain : float
        Scanner raw scale: the stored values are intensities times this gain.
    lesion_contrast : float
        Relative intensity change at the centre of a white-matter lesion
        (negative: hypo-intense, as on T1w; positive: hyper-intense, as on T2w).
    field_strength_t : float
        Written to MagneticFieldStrength.
    echo_time_ms, repetition_time_ms : float
        Written to EchoTime and RepetitionTime (descriptive only).
    """

    name: str
    contrast: str
    tissue_means: tuple[float, float, float]
    texture_gain: float
    gamma: float
    bias_strength: float
    noise: float
    in_plane_mm: float
    slice_spacing_mm: float
    slice_thickness_mm: float
    gain: float
    lesion_contrast: float
    field_strength_t: float
    echo_time_ms: float
    repetition_time_ms: float

    def __post_init__(self) -> None:
        if self.contrast not in ("T1w", "T2w"):
            raise MedfedError(
                f"unknown contrast {self.contrast!r} in scanner profile {self.name!r}",
                where="ScannerProfile.contrast",
                expected="'T1w' or 'T2w'",
            )
        for field in ("in_plane_mm", "slice_spacing_mm", "slice_thickness_mm", "gain", "gamma"):
            if not getattr(self, field) > 0:
                raise MedfedError(
                    f"scanner profile {self.name!r} has a non-positive {field}",
                    where=f"ScannerProfile.{field}",
                    expected="a positive number",
                )

    def as_dict(self) -> dict[str, object]:
        """Return the profile as JSON-ready values."""
        return dataclasses.asdict(self)


#: The four built-in site scanners; sites beyond the fourth reuse them with jitter.
DEFAULT_PROFILES: tuple[ScannerProfile, ...] = (
    ScannerProfile(
        name="t1w-3d-3mm",
        contrast="T1w",
        tissue_means=(0.22, 0.55, 0.85),
        texture_gain=1.0,
        gamma=1.0,
        bias_strength=0.08,
        noise=0.02,
        in_plane_mm=3.0,
        slice_spacing_mm=3.0,
        slice_thickness_mm=3.0,
        gain=1000.0,
        lesion_contrast=-0.45,
        field_strength_t=3.0,
        echo_time_ms=2.3,
        repetition_time_ms=2300.0,
    ),
    ScannerProfile(
        name="t1w-2d-thick",
        contrast="T1w",
        tissue_means=(0.30, 0.62, 0.80),
        texture_gain=0.8,
        gamma=0.75,
        bias_strength=0.25,
        noise=0.03,
        in_plane_mm=2.5,
        slice_spacing_mm=4.0,
        slice_thickness_mm=4.0,
        gain=2500.0,
        lesion_contrast=-0.35,
        field_strength_t=1.5,
        echo_time_ms=9.0,
        repetition_time_ms=550.0,
    ),
    ScannerProfile(
        name="t1w-lowfield-noisy",
        contrast="T1w",
        tissue_means=(0.12, 0.45, 0.90),
        texture_gain=0.6,
        gamma=1.4,
        bias_strength=0.15,
        noise=0.06,
        in_plane_mm=3.5,
        slice_spacing_mm=3.5,
        slice_thickness_mm=3.0,
        gain=700.0,
        lesion_contrast=-0.5,
        field_strength_t=0.5,
        echo_time_ms=4.0,
        repetition_time_ms=1800.0,
    ),
    ScannerProfile(
        name="t2w-like",
        contrast="T2w",
        tissue_means=(0.95, 0.55, 0.35),
        texture_gain=0.8,
        gamma=1.1,
        bias_strength=0.12,
        noise=0.035,
        in_plane_mm=2.75,
        slice_spacing_mm=4.0,
        slice_thickness_mm=3.5,
        gain=1800.0,
        lesion_contrast=0.6,
        field_strength_t=3.0,
        echo_time_ms=95.0,
        repetition_time_ms=4500.0,
    ),
)


def profile_for_site(index: int, *, seed: int) -> ScannerProfile:
    """Return the scanner profile of the site at ``index`` (0-based).

    Sites 0-3 get the built-in profiles unchanged; site ``n >= 4`` gets profile
    ``n % 4`` with its contrast curve, tissue means, bias and noise jittered
    deterministically from ``seed`` and ``n``, named ``"<base>-v<n // 4>"``.
    """
    if index < 0:
        raise MedfedError(
            f"site index {index} is negative", where="profile_for_site", expected="index >= 0"
        )
    base = DEFAULT_PROFILES[index % len(DEFAULT_PROFILES)]
    if index < len(DEFAULT_PROFILES):
        return base
    rng = np.random.default_rng([seed, index, 0x5C0FE])
    means = tuple(
        float(np.clip(m * (1 + 0.08 * rng.standard_normal()), 0.05, 1.0)) for m in base.tissue_means
    )
    return dataclasses.replace(
        base,
        name=f"{base.name}-v{index // len(DEFAULT_PROFILES)}",
        tissue_means=(means[0], means[1], means[2]),
        gamma=float(base.gamma * np.exp(0.15 * rng.standard_normal())),
        bias_strength=float(abs(base.bias_strength * (1 + 0.3 * rng.standard_normal()))),
        noise=float(abs(base.noise * (1 + 0.3 * rng.standard_normal()))),
        gain=float(round(base.gain * np.exp(0.3 * rng.standard_normal()))),
    )
