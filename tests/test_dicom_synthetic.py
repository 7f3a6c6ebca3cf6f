"""Synthetic series written with pydicom round-trip through the reader, labels included."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from medfed.core.errors import MedfedError
from medfed.data import DicomFolderSource, SkipReason, scan_folder
from medfed.data.synthetic import SyntheticGeometry, write_multiframe, write_seg, write_series

# Oblique: rows tilted 30 degrees about z, columns along -z (a sagittal-ish oblique plane).
_C, _S = np.cos(np.pi / 6), np.sin(np.pi / 6)
OBLIQUE = SyntheticGeometry(
    orientation=(_C, _S, 0.0, 0.0, 0.0, -1.0), spacing=(0.7, 0.9, 2.5), origin=(-40.0, 12.5, 80.0)
)


def _volume(rng: np.random.Generator, shape: tuple[int, int, int] = (12, 10, 7)) -> np.ndarray:
    return rng.integers(-1000, 3000, size=shape, dtype=np.int16)


def _names(rng: np.random.Generator, n: int) -> list[str]:
    return [f"{rng.integers(0, 2**40):x}.dcm" for _ in range(n)]


@pytest.mark.parametrize("syntax", [None, RLELossless, JPEG2000Lossless])
def test_shuffled_oblique_series_round_trips(syntax: str | None, tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    stored = _volume(rng, (40, 36, 5))  # JPEG 2000 needs tiles of at least 32 pixels
    names = _names(rng, stored.shape[2])
    rng.shuffle(names)
    kwargs = {"transfer_syntax": syntax} if syntax else {}
    write_series(
        tmp_path / "site" / "a" / "b",
        stored,
        geometry=OBLIQUE,
        slope=2.5,
        intercept=-1024.0,
        names=names,
        **kwargs,
    )
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    (series,) = source.series()
    image, label = source.load(series.series_uid)
    np.testing.assert_array_equal(image.numpy()[0], stored * 2.5 - 1024.0)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE.affine(), atol=1e-6)
    assert series.spacing == pytest.approx(OBLIQUE.spacing)
    assert series.shape == (1, 40, 36, 5) and series.slice_count == 5
    np.testing.assert_allclose(image.pixdim.numpy(), OBLIQUE.spacing, atol=1e-6)
    assert image.meta["space"] == "LPS" and label is None


def test_multiframe_with_per_frame_groups_round_trips(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    stored = _volume(rng, (8, 9, 6))
    slopes = rng.uniform(0.5, 2.0, size=6).round(2)
    intercepts = rng.integers(-100, 100, size=6).astype(float)
    order = rng.permutation(6)
    write_multiframe(
        tmp_path / "site" / "mf.dcm",
        stored,
        geometry=OBLIQUE,
        slopes=slopes,
        intercepts=intercepts,
        frame_order=order,
    )
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    (series,) = source.series()
    image, _ = source.load(series.series_uid)
    expected = stored * slopes[None, None, :] + intercepts[None, None, :]
    np.testing.assert_allclose(image.numpy()[0], expected, rtol=1e-6)
    np.testing.assert_allclose(image.affine.numpy(), OBLIQUE.affine(), atol=1e-6)
    assert series.file_count == 1 and series.slice_count == 6


@pytest.mark.parametrize(
    ("drop", "positions", "reason"),
    [
        ([3], None, SkipReason.MISSING_SLICES),
        ([], [0, 1, 2, 3.6, 5, 6], SkipReason.INCONSISTENT_SPACING),
        ([], [0, 1, 2, 2, 4, 5], SkipReason.DUPLICATE_POSITIONS),
    ],
)
def test_bad_slice_geometry_is_reported(
    drop: list[int], positions: list[float] | None, reason: SkipReason, tmp_path: Path
) -> None:
    rng = np.random.default_rng(11)
    geometry = SyntheticGeometry(spacing=(1.0, 1.0, 2.0))
    paths = write_series(tmp_path / "site", _volume(rng, (4, 4, 6)), geometry=geometry)
    for k in drop:
        paths[k].unlink()
    if positions is not None:
        import pydicom

        for path, z in zip(paths, positions, strict=True):
            ds = pydicom.dcmread(path)
            ds.ImagePositionPatient = [0.0, 0.0, 2.0 * z]
            ds.save_as(path)
    report = scan_folder(tmp_path / "site")
    assert report.series == ()
    assert {s.reason for s in report.skipped} == {reason.value}


def _ras_affine(affine_lps: np.ndarray) -> np.ndarray:
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_lps


@pytest.mark.parametrize("flip_x", [False, True])
def test_nifti_label_from_manifest_lands_on_the_series(flip_x: bool, tmp_path: Path) -> None:
    nib = pytest.importorskip("nibabel")
    rng = np.random.default_rng(5)
    uid = generate_uid()
    write_series(tmp_path / "site", _volume(rng), geometry=OBLIQUE, series_uid=uid)
    labels = rng.integers(0, 4, size=(12, 10, 7)).astype(np.int16)
    affine = OBLIQUE.affine()
    data = labels
    if flip_x:  # same grid, x axis stored reversed: a different but equivalent affine
        data = labels[::-1]
        flip = np.eye(4)
        flip[0, 0], flip[0, 3] = -1, labels.shape[0] - 1
        affine = affine @ flip
    (tmp_path / "labels").mkdir()
    nib.save(
        nib.Nifti1Image(np.ascontiguousarray(data), _ras_affine(affine)),
        str(tmp_path / "labels" / "l.nii.gz"),
    )
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"version": 1, "labels": {uid: "labels/l.nii.gz"}}))
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache", manifest=manifest)
    (series,) = source.series()
    assert series.label_source == "manifest"
    image, label = source.load(uid)
    assert label is not None and tuple(label.shape) == (1, 12, 10, 7)
    np.testing.assert_array_equal(label.numpy()[0], labels)
    np.testing.assert_allclose(label.affine.numpy(), image.affine.numpy())


def test_manifest_errors_are_medfed_errors(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text('{"labels": ["not", "a", "mapping"]}')
    with pytest.raises(MedfedError, match="malformed"):
        DicomFolderSource(tmp_path, manifest=bad)
    missing = tmp_path / "m.csv"
    missing.write_text("series_uid,label\n1.2.3,nothere.nii.gz\n")
    with pytest.raises(MedfedError, match="do not exist"):
        DicomFolderSource(tmp_path, manifest=missing)


@pytest.mark.parametrize("by_sop", [False, True])
def test_synthetic_seg_decodes_onto_its_series(by_sop: bool, tmp_path: Path) -> None:
    rng = np.random.default_rng(9)
    uid = generate_uid()
    sops = [generate_uid() for _ in range(7)]
    names = _names(rng, 7)
    write_series(
        tmp_path / "site" / "ct",
        _volume(rng),
        geometry=OBLIQUE,
        series_uid=uid,
        sop_uids=sops,
        names=names,
    )
    labels = np.zeros((12, 10, 7), dtype=np.int16)
    labels[2:6, 3:8, 1:4] = 1
    labels[7:11, 1:4, 4:6] = 2
    write_seg(
        tmp_path / "site" / "seg" / "seg.dcm",
        labels,
        geometry=OBLIQUE,
        series_uid=uid,
        source_sops=sops if by_sop else None,
    )
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    (series,) = source.series()
    assert series.label_source == "seg"
    _, label = source.load(uid)
    assert label is not None
    np.testing.assert_array_equal(label.numpy()[0], labels)
    report = scan_folder(tmp_path / "site")
    assert report.skipped == () and report.series[0].label == "seg"


def test_shipped_liver_seg_decodes_onto_a_matching_series(tmp_path: Path) -> None:
    import pydicom

    seg_path = Path(get_testdata_file("liver_1frame.dcm"))
    seg = pydicom.dcmread(seg_path)
    ref = seg.ReferencedSeriesSequence[0]
    sops = [str(item.ReferencedSOPInstanceUID) for item in ref.ReferencedInstanceSequence][::-1]
    position = [
        float(v)
        for v in seg.PerFrameFunctionalGroupsSequence[0]
        .PlanePositionSequence[0]
        .ImagePositionPatient
    ]
    spacing = float(seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing[0])
    geometry = SyntheticGeometry(
        spacing=(spacing, spacing, 1.0), origin=(position[0], position[1], position[2] - 2.0)
    )
    write_series(
        tmp_path / "site" / "ct",
        np.zeros((512, 512, 3), np.int16),
        geometry=geometry,
        series_uid=str(ref.SeriesInstanceUID),
        sop_uids=sops,
    )
    shutil.copy(seg_path, tmp_path / "site" / "seg.dcm")
    source = DicomFolderSource(tmp_path / "site", cache_dir=tmp_path / "cache")
    (series,) = source.series()
    _, label = source.load(series.series_uid)
    assert label is not None
    expected = seg.pixel_array.astype(bool).T  # (rows, cols) -> (x, y)
    on_slice = label.numpy()[0]
    np.testing.assert_array_equal(on_slice[..., 2] == 1, expected)
    assert on_slice[..., :2].sum() == 0
