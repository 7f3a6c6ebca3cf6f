"""On-disk tests of the synthetic benchmark: DICOM round trip, manifests, determinism."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfed.core.errors import MedfedError
from medfed.synth import (
    SUMMARY_HEADER,
    load_subject_arrays,
    profile_for_site,
    read_site_manifest,
    synthesize_sites,
    synthesize_subject,
)
from medfed.synth.sites import lesion_flags

SEED = 11


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Write 4 sites x 2 subjects once for the module."""
    out = tmp_path_factory.mktemp("synth") / "out"
    synthesize_sites(out, sites=4, subjects_per_site=2, seed=SEED)
    return out


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_layout_and_manifests(synth_dir: Path) -> None:
    """Layout and manifests."""
    top = json.loads((synth_dir / "synth.json").read_text())
    assert top["seed"] == SEED and len(top["sites"]) == 4
    assert top["real"] and top["synthetic"]
    for n in range(1, 5):
        site = synth_dir / f"site-{n}"
        man = read_site_manifest(site)
        assert man.site == f"site-{n}" and len(man.series) == 2
        for uid, entry in man.series.items():
            assert entry.subject.startswith(f"SYN-site{n}-")
            assert (site / entry.label).is_file()
            files = sorted((site / entry.dicom).glob("*.dcm"))
            ds = pydicom.dcmread(files[0])
            assert ds.SeriesInstanceUID == uid
            assert ds.PatientID == entry.subject
            assert ds.Modality == "MR"
            assert entry.profile == man.profile.name == profile_for_site(n - 1, seed=SEED).name
            assert entry.lesion == (entry.lesion_centre_mni_mm is not None)
        assert sum(e.lesion for e in man.series.values()) == 1


def test_dicom_round_trip_equals_generated_volume(synth_dir: Path) -> None:
    """Dicom round trip equals generated volume."""
    for site_index in range(4):
        site = synth_dir / f"site-{site_index + 1}"
        man = read_site_manifest(site)
        for subject_index, entry in enumerate(man.series.values()):
            vol = synthesize_subject(
                man.profile,
                seed=SEED,
                site_index=site_index,
                subject_index=subject_index,
                lesion=entry.lesion,
            )
            # Independent read: plain pydicom, sorted by ImagePositionPatient along the normal.
            slices = [pydicom.dcmread(p) for p in (site / entry.dicom).glob("*.dcm")]
            iop = np.asarray(slices[0].ImageOrientationPatient, float)
            normal = np.cross(iop[:3], iop[3:])
            slices.sort(key=lambda s: float(np.dot(s.ImagePositionPatient, normal)))
            assert [int(s.InstanceNumber) for s in slices] == list(range(1, len(slices) + 1))
            slope = float(slices[0].RescaleSlope)
            arr = np.stack(
                [s.pixel_array.T * slope + float(s.RescaleIntercept) for s in slices], axis=-1
            )
            assert arr.shape == vol.image.shape
            assert np.abs(arr - vol.image).max() <= slope / 2 + 1e-3
            g = vol.geometry
            dj, di = (float(v) for v in slices[0].PixelSpacing)
            pos = np.asarray([s.ImagePositionPatient for s in slices], float)
            assert (di, dj) == g.spacing[:2]
            assert np.allclose(np.diff(pos @ normal), g.spacing[2])
            assert float(slices[0].SpacingBetweenSlices) == g.spacing[2]
            assert float(slices[0].SliceThickness) == g.slice_thickness
            assert np.allclose(iop, [*g.row_cosine, *g.col_cosine])
            assert np.allclose(pos[0], g.origin_lps)
            # Labels: same array, affine equals the DICOM-derived RAS affine.
            nii = nib.load(site / entry.label)
            assert np.array_equal(np.asarray(nii.dataobj), vol.label)
            lps = np.eye(4)
            lps[:3, 0], lps[:3, 1], lps[:3, 2] = iop[:3] * di, iop[3:] * dj, normal * g.spacing[2]
            lps[:3, 3] = pos[0]
            assert np.allclose(nii.affine, np.diag([-1, -1, 1, 1]) @ lps, atol=1e-4)
            # The helper the DICOM reader is checked against agrees.
            back = load_subject_arrays(site, entry.subject)
            assert np.allclose(back.image, arr, rtol=0, atol=1e-3)
            assert np.array_equal(back.label, vol.label)
            assert back.spacing == g.spacing


def test_monai_pydicom_reader_agrees_with_convention(synth_dir: Path) -> None:
    """Monai pydicom reader agrees with convention."""
    monai_data = pytest.importorskip("monai.data")
    site = synth_dir / "site-2"
    entry = next(iter(read_site_manifest(site).series.values()))
    reader = monai_data.PydicomReader()
    arr, meta = reader.get_data(reader.read(str(site / entry.dicom)))
    back = load_subject_arrays(site, entry.subject)
    assert arr.shape == back.image.shape
    assert np.allclose(arr, back.image, atol=1e-3)
    assert np.allclose(meta["affine"], nib.load(site / entry.label).affine, atol=1e-3)


def test_same_seed_gives_identical_files(synth_dir: Path, tmp_path: Path) -> None:
    """Same seed gives identical files."""
    again = tmp_path / "again"
    synthesize_sites(again, sites=4, subjects_per_site=2, seed=SEED)
    assert _tree_digest(again) == _tree_digest(synth_dir)


def test_other_seed_gives_other_uids_and_pixels(tmp_path: Path) -> None:
    """Other seed gives other uids and pixels."""
    a = synthesize_sites(tmp_path / "a", sites=1, subjects_per_site=1, seed=1)
    b = synthesize_sites(tmp_path / "b", sites=1, subjects_per_site=1, seed=2)
    ma, mb = read_site_manifest(a.out / "site-1"), read_site_manifest(b.out / "site-1")
    assert set(ma.series).isdisjoint(mb.series)
    ia = load_subject_arrays(a.out / "site-1", "SYN-site1-001").image
    ib = load_subject_arrays(b.out / "site-1", "SYN-site1-001").image
    assert not np.array_equal(ia, ib)


def test_summary_rows_match_header(synth_dir: Path, tmp_path: Path) -> None:
    """Summary rows match header."""
    m = synthesize_sites(tmp_path / "s", sites=2, subjects_per_site=1, seed=0)
    rows = m.summary_rows()
    assert len(rows) == 2 and all(len(r) == len(SUMMARY_HEADER) for r in rows)
    assert m.sites[1].contrast == "T1w" and m.sites[0].files > 1


def test_refuses_non_empty_folder_and_overwrites_only_its_own(tmp_path: Path) -> None:
    """Refuses non empty folder and overwrites only its own."""
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(MedfedError, match="not empty"):
        synthesize_sites(foreign, sites=1, subjects_per_site=1, seed=0)
    with pytest.raises(MedfedError, match="did not write"):
        synthesize_sites(foreign, sites=1, subjects_per_site=1, seed=0, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"
    own = tmp_path / "own"
    synthesize_sites(own, sites=2, subjects_per_site=1, seed=0)
    synthesize_sites(own, sites=1, subjects_per_site=1, seed=0, overwrite=True)
    assert sorted(p.name for p in own.iterdir()) == ["site-1", "synth.json"]


@pytest.mark.parametrize(
    ("kwargs", "where"),
    [
        ({"sites": 0}, "--sites"),
        ({"subjects_per_site": 0}, "--subjects"),
        ({"seed": -1}, "--seed"),
        ({"lesion_fraction": 1.5}, "lesion_fraction"),
    ],
)
def test_bad_arguments_raise_medfed_error(tmp_path: Path, kwargs: dict, where: str) -> None:
    """Bad arguments raise medfed error."""
    args = {"sites": 1, "subjects_per_site": 1, "seed": 0, **kwargs}
    with pytest.raises(MedfedError) as err:
        synthesize_sites(tmp_path / "x", **args)
    assert err.value.where == where
    assert not (tmp_path / "x").exists()


def test_unknown_subject_names_the_known_ones(synth_dir: Path) -> None:
    """Unknown subject names the known ones."""
    with pytest.raises(MedfedError, match="SYN-site1-001"):
        load_subject_arrays(synth_dir / "site-1", "SYN-site1-099")


def test_lesion_flags_are_balanced_and_deterministic() -> None:
    """Lesion flags are balanced and deterministic."""
    f = lesion_flags(10, seed=3, site_index=1, fraction=0.5)
    assert f.sum() == 5 and np.array_equal(f, lesion_flags(10, seed=3, site_index=1, fraction=0.5))


@pytest.mark.slow
def test_default_size_four_sites_is_fast(tmp_path: Path) -> None:
    """Default size four sites is fast."""
    start = time.perf_counter()
    m = synthesize_sites(tmp_path / "full", sites=4, subjects_per_site=10, seed=0)
    elapsed = time.perf_counter() - start
    assert elapsed < 60
    assert [s.lesion_subjects for s in m.sites] == [5, 5, 5, 5]
    for s in m.sites:
        assert 40 <= s.shape[0] <= 80 and 35 <= s.shape[2] <= 64
