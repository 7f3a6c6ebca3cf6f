"""Public pretraining data: Colin27 (mricron-data), another brain than the sites' MNI152."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medfed.core.errors import MedfedError
from medfed.synth import DEFAULT_PROFILES, colin27, public, synthesize_subject
from medfed.synth.colin27 import colin27_missing, load_colin27
from medfed.synth.template import load_template

needs_colin27 = pytest.mark.skipif(
    bool(colin27_missing()), reason=f"needs Debian's mricron-data: {colin27_missing()}"
)


@needs_colin27
def test_colin27_is_on_the_mni_grid_with_three_plausible_tissues() -> None:
    c, m = load_colin27(), load_template()
    assert c.t1.shape == c.labels.shape == c.mask.shape == c.texture.shape == m.t1.shape
    assert c.tissue.shape == (3, *m.t1.shape)
    np.testing.assert_array_equal(c.affine, m.affine)
    assert set(np.unique(c.labels)) == {0, 1, 2, 3}
    assert np.array_equal(c.labels > 0, c.mask)
    assert 1200 < c.mask.sum() * 8 / 1000 < 2100  # brain volume, mL (2 mm voxels)
    assert c.tissue.min() >= 0 and c.tissue.max() <= 1 + 1e-6
    np.testing.assert_allclose(c.tissue.sum(axis=0)[c.mask], 1.0, atol=1e-4)
    fractions = np.bincount(c.labels[c.mask], minlength=4)[1:] / c.mask.sum()
    csf, gm, wm = fractions
    assert 0.03 < csf < 0.25 and 0.3 < gm < 0.7 and 0.2 < wm < 0.55, fractions
    # A T1: CSF darkest, white matter brightest; the same 0-1 scale as MNI152.
    means = [float(c.t1[c.labels == k].mean()) for k in (1, 2, 3)]
    assert means == sorted(means) and 0.9 < c.t1.max() <= 1.0
    assert not c.t1.flags.writeable and not c.tissue.flags.writeable


@needs_colin27
def test_colin27_is_another_brain_than_mni152() -> None:
    """Its labels overlap MNI152's as two brains' do, far from the same map."""
    c, m = load_colin27(), load_template()
    dice = []
    for k in (1, 2, 3):
        a, b = c.labels == k, m.labels == k
        dice.append(2 * float((a & b).sum()) / float(a.sum() + b.sum()))
    assert max(dice) < 0.85 and float(np.mean(dice)) < 0.75, dice
    brain = c.mask & m.mask
    assert float(np.corrcoef(c.t1[brain], m.t1[brain])[0, 1]) < 0.9


@needs_colin27
def test_public_subjects_are_warps_of_colin27_while_sites_stay_on_mni152() -> None:
    vol = public.public_subjects(1, seed=4)[0]
    rng = np.random.default_rng([4, public._PUBLIC_STREAM])
    profile = public.random_profile(rng)
    args = dict(
        seed=4, site_index=public.PUBLIC_SITE_BASE, subject_index=0, lesion=rng.random() < 0.5
    )
    on_colin = synthesize_subject(profile, **args, template=load_colin27())
    on_mni = synthesize_subject(profile, **args)
    np.testing.assert_array_equal(vol.label, on_colin.label)
    np.testing.assert_array_equal(vol.image, on_colin.image)
    assert not np.array_equal(vol.label, on_mni.label)
    # A site's subject is still MNI152's anatomy by default.
    site = dict(seed=0, site_index=0, subject_index=0, lesion=False)
    by_default = synthesize_subject(DEFAULT_PROFILES[0], **site)
    on_template = synthesize_subject(DEFAULT_PROFILES[0], **site, template=load_template())
    np.testing.assert_array_equal(by_default.label, on_template.label)


def test_a_missing_or_broken_colin27_names_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    missing = tmp_path / "ch2bet.nii.gz"
    monkeypatch.setattr(colin27, "COLIN27_PATH", missing)
    assert "apt install mricron-data" in colin27_missing()
    uncached = colin27.load_colin27.__wrapped__  # the cached copy stays for the other tests
    with pytest.raises(MedfedError, match="is not installed") as err:
        uncached()
    assert err.value.where == str(missing)
    assert "apt install mricron-data" in err.value.fix
    assert "mricron-data" in err.value.expected
    monkeypatch.setattr(public, "load_colin27", uncached)
    with pytest.raises(MedfedError, match="apt install mricron-data"):
        public.public_subjects(1, seed=0)
    missing.write_bytes(b"not a NIfTI file")
    with pytest.raises(MedfedError, match="cannot be read") as err:
        uncached()
    assert "apt install mricron-data" in err.value.fix
