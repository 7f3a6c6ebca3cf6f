"""Array-level tests of the synthetic benchmark: determinism, labels, scanners, lesions."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from medfed.core.errors import MedfedError
from medfed.synth import (
    DEFAULT_PROFILES,
    ScannerProfile,
    profile_for_site,
    quantise,
    synthesize_subject,
)
from medfed.synth.geometry import axial_geometry
from medfed.synth.template import load_template


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str((a.shape, a.dtype)).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _subject(site: int, subject: int = 0, *, seed: int = 7, lesion: bool = False):
    return synthesize_subject(
        DEFAULT_PROFILES[site], seed=seed, site_index=site, subject_index=subject, lesion=lesion
    )


def test_template_is_read_offline_with_four_labels() -> None:
    """Template is read offline with four labels."""
    t = load_template()
    assert t.labels.shape == t.t1.shape == t.tissue.shape[1:]
    assert set(np.unique(t.labels)) == {0, 1, 2, 3}
    assert np.array_equal(t.labels > 0, t.mask)


def test_same_seed_same_arrays_other_seed_other_arrays() -> None:
    """Same seed same arrays other seed other arrays."""
    a, b = _subject(0, 3, lesion=True), _subject(0, 3, lesion=True)
    assert _digest(a.image, a.label) == _digest(b.image, b.label)
    assert a.lesion == b.lesion
    c = _subject(0, 3, seed=8, lesion=True)
    assert _digest(a.image) != _digest(c.image)
    d = _subject(0, 4, lesion=True)
    assert _digest(a.label) != _digest(d.label)


def test_labels_have_plausible_tissue_proportions() -> None:
    """Labels have plausible tissue proportions."""
    for site in range(len(DEFAULT_PROFILES)):
        label = _subject(site).label
        brain = label > 0
        assert 0.15 < brain.mean() < 0.6
        frac = [float((label[brain] == c).mean()) for c in (1, 2, 3)]
        csf, gm, wm = frac
        assert 0.02 < csf < 0.2, frac
        assert 0.4 < gm < 0.7, frac
        assert 0.2 < wm < 0.5, frac


def _tissue_means(vol) -> np.ndarray:
    return np.array([vol.image[vol.label == c].mean() for c in (1, 2, 3)])


def test_sites_differ_like_scanners() -> None:
    """Sites differ like scanners."""
    vols = [_subject(site) for site in range(len(DEFAULT_PROFILES))]
    means = [_tissue_means(v) for v in vols]
    # T1-like sites: CSF < GM < WM; the T2-like site: CSF > GM > WM.
    for site, m in enumerate(means):
        if DEFAULT_PROFILES[site].contrast == "T1w":
            assert m[0] < m[1] < m[2], (site, m)
        else:
            assert m[0] > m[1] > m[2], (site, m)
    # Contrast (WM/GM) and raw scale differ across the sites.
    wm_gm = [m[2] / m[1] for m in means]
    assert min(np.diff(sorted(wm_gm))) > 0.05, wm_gm
    assert len({round(float(m[2]), -1) for m in means}) == len(means)
    shapes = {v.image.shape for v in vols}
    assert len(shapes) == len(vols)
    # Noise: background spread grows with the profile's noise level.
    bg = [
        float(v.image[v.label == 0].std() / (m[2] if m[2] > m[0] else m[0]))
        for v, m in zip(vols, means, strict=True)
    ]
    assert bg[2] > bg[0]


def test_lesion_changes_only_white_matter_near_its_centre() -> None:
    """Lesion changes only white matter near its centre."""
    for site in (0, 3):
        plain, sick = _subject(site, 2), _subject(site, 2, lesion=True)
        assert plain.lesion is None and sick.lesion is not None
        assert np.array_equal(plain.label, sick.label)
        diff = sick.image - plain.image
        changed = np.abs(diff) > 0.02 * np.abs(plain.image).max()
        assert changed.sum() > 20
        # Most of the change falls in white matter (the blob is weighted by WM probability).
        assert (plain.label[changed] == 3).mean() > 0.6
        sign = np.sign(DEFAULT_PROFILES[site].lesion_contrast)
        assert np.sign(diff[changed].sum()) == sign
        wm = plain.label == 3
        assert abs(sick.image[wm].mean() - plain.image[wm].mean()) > 0


def test_quantise_error_is_within_half_slope() -> None:
    """Quantise error is within half slope."""
    img = np.random.default_rng(0).uniform(0, 1234.5, size=(5, 6, 7)).astype(np.float32)
    stored, slope, intercept = quantise(img)
    assert stored.dtype == np.uint16 and stored.max() <= 4095
    assert len(repr(slope)) <= 16
    err = np.abs(stored * slope + intercept - img)
    assert err.max() <= slope / 2 + 1e-4


def test_geometry_affine_convention() -> None:
    """Geometry affine convention."""
    g = axial_geometry(
        fov_mm=(30, 40, 20),
        centre_ras=(1, 2, 3),
        in_plane_mm=2.0,
        slice_spacing_mm=4.0,
        slice_thickness_mm=3.0,
    )
    assert g.shape == (15, 20, 5)
    ras = g.affine_ras()
    # i runs toward patient left (RAS -x), j posterior (RAS -y), k superior (RAS +z).
    assert np.allclose(np.diag(ras)[:3], [-2.0, -2.0, 4.0])
    centre = ras @ np.array([7, 9.5, 2, 1.0])
    assert np.allclose(centre[:3], [1, 2, 3])
    assert np.allclose(g.slice_position(2), g.affine_lps()[:3, :3] @ [0, 0, 2] + g.origin_lps)


def test_profiles_beyond_four_are_jittered_variants() -> None:
    """Profiles beyond four are jittered variants."""
    assert profile_for_site(1, seed=0) is DEFAULT_PROFILES[1]
    p5 = profile_for_site(5, seed=0)
    assert p5.name == f"{DEFAULT_PROFILES[1].name}-v1"
    assert p5 != DEFAULT_PROFILES[1]
    assert p5 == profile_for_site(5, seed=0)
    with pytest.raises(MedfedError):
        profile_for_site(-1, seed=0)


def test_profile_rejects_bad_contrast() -> None:
    """Profile rejects bad contrast."""
    with pytest.raises(MedfedError, match="contrast"):
        dataclasses.replace(DEFAULT_PROFILES[0], contrast="PD")
    assert isinstance(DEFAULT_PROFILES[0], ScannerProfile)
