"""Array-level synthesis: one subject = deformed template + lesion + one scanner's physics.

Pure functions on numpy arrays; nothing here touches the disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medfed.synth.geometry import SeriesGeometry, axial_geometry
from medfed.synth.profiles import ScannerProfile
from medfed.synth.template import TEMPLATE_RESOLUTION_MM, TemplateVolumes, load_template

#: Field of view (RAS mm: left-right, anterior-posterior, inferior-superior) of every series.
FOV_MM: tuple[float, float, float] = (168.0, 198.0, 156.0)
#: Nominal FOV centre (RAS mm), close to the centre of the template's brain.
FOV_CENTRE_RAS: tuple[float, float, float] = (0.0, -17.0, 4.0)
#: Largest stored value (12-bit data in 16-bit words, as most MR scanners write).
MAX_STORED = 4095

# Purpose tags mixed into the seed so each random stream is independent of the others.
_SITE_STREAM, _SUBJECT_STREAM, _LESION_STREAM, _NOISE_STREAM = 0x517E, 0x5B1EC7, 0x1E5, 0x4015E


@dataclass(frozen=True)
class Lesion:
    """A synthetic white-matter lesion: a Gaussian blob in template (MNI RAS mm) space."""

    centre_mni_mm: tuple[float, float, float]
    sigma_mm: float
    contrast: float


@dataclass(frozen=True)
class SubjectVolume:
    """One synthetic subject on its site's grid.

    ``image`` is float32 in scanner units (before quantisation), ``label`` uint8
    (0 background, 1 CSF, 2 GM, 3 WM); both have axes (i, j, k) = DICOM
    (column, row, slice), see :mod:`medfed.synth.geometry`.
    """

    image: np.ndarray
    label: np.ndarray
    geometry: SeriesGeometry
    lesion: Lesion | None


def site_geometry(profile: ScannerProfile, *, seed: int, site_index: int) -> SeriesGeometry:
    """Return the acquisition grid of a site: its profile's spacing, centred with a site shift."""
    rng = np.random.default_rng([seed, site_index, _SITE_STREAM])
    shift = rng.normal(0.0, 3.0, size=3)
    centre = [float(v) for v in np.round(np.asarray(FOV_CENTRE_RAS) + shift, 1)]
    return axial_geometry(
        fov_mm=FOV_MM,
        centre_ras=centre,
        in_plane_mm=profile.in_plane_mm,
        slice_spacing_mm=profile.slice_spacing_mm,
        slice_thickness_mm=profile.slice_thickness_mm,
    )


def smooth_random_field(
    rng: np.random.Generator, shape: tuple[int, int, int], *, control_points: int
) -> np.ndarray:
    """Return a smooth zero-mean unit-variance 3-D field from a coarse Gaussian grid.

    The ``control_points ** 3`` standard-normal values are spread over the grid with a
    separable Gaussian kernel (width 0.7 control-point spacings), i.e. a tensor-product
    radial-basis interpolation: smooth, cheap and exactly reproducible.
    """
    coarse = rng.standard_normal((control_points,) * 3)
    mats = []
    for n in shape:
        x = np.linspace(0.0, control_points - 1.0, n)[:, None]
        w = np.exp(-((x - np.arange(control_points)[None, :]) ** 2) / (2 * 0.7**2))
        mats.append(w / w.sum(axis=1, keepdims=True))
    field = np.einsum("ia,jb,kc,abc->ijk", *mats, coarse, optimize=True)
    std = float(field.std())
    return ((field - field.mean()) / (std if std > 0 else 1.0)).astype(np.float32)


def _rotation(angles_rad: np.ndarray) -> np.ndarray:
    ax, ay, az = angles_rad
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def template_sample_points(
    geometry: SeriesGeometry, template_affine: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Map each voxel of ``geometry`` to template voxel coordinates through a random warp.

    The warp is a small random affine (rotation ~3 deg, scale ~4 %, shift ~2.5 mm) plus a
    smooth random displacement field (4^3 control points, ~3 mm), both drawn from ``rng``.
    Returns shape ``(3, *geometry.shape)``.
    """
    pts = geometry.ras_points().reshape(3, -1)
    centre = pts.mean(axis=1, keepdims=True)
    rot = _rotation(np.deg2rad(rng.normal(0.0, 3.0, size=3)))
    scale = np.diag(np.exp(rng.normal(0.0, 0.04, size=3)))
    shift = rng.normal(0.0, 2.5, size=(3, 1))
    disp = (
        np.stack(
            [
                smooth_random_field(rng, geometry.shape, control_points=4).reshape(-1)
                for _ in range(3)
            ]
        )
        * 3.0
    )
    src = centre + (rot @ scale) @ (pts - centre) + shift + disp
    inv = np.linalg.inv(template_affine)
    vox = inv[:3, :3] @ src + inv[:3, 3:4]
    return vox.reshape((3, *geometry.shape))


def draw_lesion(
    template: TemplateVolumes, profile: ScannerProfile, rng: np.random.Generator
) -> Lesion:
    """Draw a lesion centre in deep white matter (WM probability > 0.95) and its size."""
    candidates = np.argwhere(template.tissue[2] > 0.95)
    vox = candidates[rng.integers(len(candidates))].astype(float)
    centre = template.affine[:3, :3] @ vox + template.affine[:3, 3]
    return Lesion(
        centre_mni_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        sigma_mm=float(rng.uniform(4.0, 7.0)),
        contrast=profile.lesion_contrast,
    )


def tissue_image(
    template: TemplateVolumes,
    profile: ScannerProfile,
    rng: np.random.Generator,
    lesion: Lesion | None,
) -> np.ndarray:
    """Return the template-space intensity image (0-1 scale) for one subject.

    Tissue means (jittered 4 % per subject) weighted by the tissue probabilities, plus
    the template's own texture (sign flipped for T2w), times the lesion blob in WM,
    blurred by the profile's in-plane resolution and slice thickness.
    """
    means = np.asarray(profile.tissue_means) * (1.0 + 0.04 * rng.standard_normal(3))
    sign = 1.0 if profile.contrast == "T1w" else -1.0
    img = np.tensordot(means.astype(np.float32), template.tissue, axes=1)
    img += np.float32(sign * profile.texture_gain) * template.texture
    if lesion is not None:
        inv = np.linalg.inv(template.affine)
        c = inv[:3, :3] @ np.asarray(lesion.centre_mni_mm) + inv[:3, 3]
        s = lesion.sigma_mm / TEMPLATE_RESOLUTION_MM
        gi, gj, gk = (np.arange(n, dtype=np.float32) for n in img.shape)
        d2 = (
            ((gi - c[0]) ** 2)[:, None, None]
            + ((gj - c[1]) ** 2)[None, :, None]
            + ((gk - c[2]) ** 2)[None, None, :]
        )
        blob = np.exp(-d2 / np.float32(2 * s * s))
        img *= 1.0 + np.float32(lesion.contrast) * blob * template.tissue[2]
    res = float(TEMPLATE_RESOLUTION_MM)
    fwhm = np.array([profile.in_plane_mm, profile.in_plane_mm, profile.slice_thickness_mm])
    sigma = np.sqrt(np.clip(fwhm**2 - res**2, 0, None)) / 2.3548 / res
    return ndimage.gaussian_filter(img, sigma=sigma, mode="constant")


def synthesize_subject(
    profile: ScannerProfile,
    *,
    seed: int,
    site_index: int,
    subject_index: int,
    lesion: bool,
    template: TemplateVolumes | None = None,
) -> SubjectVolume:
    """Synthesize one subject of one site; the same arguments give the same arrays.

    ``template`` is the anatomy warped: MNI152 (:func:`load_template`, the benchmark's
    sites) unless another brain on the same grid is given (public pretraining passes
    Colin27, :mod:`medfed.synth.colin27`).

    Each random stream (anatomy warp, tissue jitter, lesion, bias, noise) has its own
    generator seeded from ``(seed, site_index, subject_index, stream)``, so turning the
    lesion on or off changes nothing else.
    """
    template = load_template() if template is None else template
    geometry = site_geometry(profile, seed=seed, site_index=site_index)
    rng = np.random.default_rng([seed, site_index, subject_index, _SUBJECT_STREAM])
    lesion_rng = np.random.default_rng([seed, site_index, subject_index, _LESION_STREAM])
    noise_rng = np.random.default_rng([seed, site_index, subject_index, _NOISE_STREAM])
    site_rng = np.random.default_rng([seed, site_index, _SITE_STREAM, 1])

    les = draw_lesion(template, profile, lesion_rng) if lesion else None
    source = tissue_image(template, profile, rng, les)
    coords = template_sample_points(geometry, template.affine, rng)
    img = ndimage.map_coordinates(source, coords, order=1, mode="constant", cval=0.0)
    label = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant", cval=0)

    img = np.clip(img, 0.0, None) ** profile.gamma
    site_bias = smooth_random_field(site_rng, geometry.shape, control_points=3)
    subj_bias = smooth_random_field(rng, geometry.shape, control_points=3)
    img *= np.exp(profile.bias_strength * (0.8 * site_bias + 0.6 * subj_bias))
    sigma = profile.noise * max(profile.tissue_means) ** profile.gamma
    n1 = noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    n2 = noise_rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    img = np.sqrt((img + n1) ** 2 + n2**2)
    image = (img * profile.gain).astype(np.float32)
    return SubjectVolume(image=image, label=label.astype(np.uint8), geometry=geometry, lesion=les)


def quantise(image: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Return ``(stored uint16, slope, intercept)`` with ``stored * slope + intercept ~ image``.

    The slope has six significant digits (exact in a DICOM DS string) and maps the
    maximum to at most ``MAX_STORED``; the error is at most ``slope / 2``.
    """
    top = max(float(image.max()), 1e-6)
    raw = top / MAX_STORED
    exp10 = math.floor(math.log10(raw)) - 5
    slope = round(math.ceil(raw / 10.0**exp10) * 10.0**exp10, -exp10)
    intercept = 0.0
    stored = np.clip(np.rint((image - intercept) / slope), 0, MAX_STORED).astype(np.uint16)
    return stored, float(slope), intercept
