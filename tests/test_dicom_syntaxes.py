"""Compressed and unusual transfer syntaxes decode to the uncompressed reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from medfed.data import load_series


def _load(name: str) -> tuple[np.ndarray, np.ndarray]:
    image, _ = load_series([Path(get_testdata_file(name))])
    return image.numpy(), image.affine.numpy()


@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",  # RLE Lossless
        "MR_small_bigendian.dcm",  # Explicit VR Big Endian
        "MR_small_expb.dcm",  # Explicit VR Big Endian
        "MR_small_implicit.dcm",  # Implicit VR Little Endian
        "MR_small_jp2klossless.dcm",  # JPEG 2000 Lossless
        "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS Lossless
        "MR_small_padded.dcm",  # odd padding after the pixel data
    ],
)
def test_lossless_variants_equal_the_reference(variant: str) -> None:
    reference, ref_affine = _load("MR_small.dcm")
    image, affine = _load(variant)
    np.testing.assert_array_equal(image, reference)
    np.testing.assert_allclose(affine, ref_affine)


@pytest.mark.parametrize("variant", ["rtdose_expb.dcm", "rtdose_rle.dcm"])
def test_multiframe_variants_equal_the_reference(variant: str) -> None:
    reference, ref_affine = _load("rtdose.dcm")
    image, affine = _load(variant)
    assert reference.shape == (1, 10, 10, 15)
    np.testing.assert_allclose(image, reference)
    np.testing.assert_allclose(affine, ref_affine)


def test_rtdose_frames_follow_the_grid_frame_offsets() -> None:
    image, affine = _load("rtdose.dcm")
    assert affine[2, 2] == pytest.approx(5.0)  # GridFrameOffsetVector steps of 5 mm
    assert image.max() > 0


@pytest.mark.parametrize(
    ("variant", "mean_tol", "max_tol"),
    [
        ("SC_rgb_dcmtk_+eb+cr.dcm", 0.5, 4),  # JPEG baseline, RGB
        ("SC_rgb_jpeg_dcmtk.dcm", 2.0, 16),  # JPEG baseline, YBR_FULL
        ("SC_rgb_gdcm_KY.dcm", 0.0, 0),  # JPEG 2000 lossless
        ("SC_rgb_jpeg_gdcm.dcm", 0.0, 0),  # JPEG lossless (process 14)
    ],
)
def test_colour_variants_match_the_rle_reference(
    variant: str, mean_tol: float, max_tol: int
) -> None:
    reference, _ = _load("SC_rgb_rle.dcm")
    image, _ = _load(variant)
    assert image.shape == reference.shape == (3, 100, 100, 1)
    diff = np.abs(image - reference)
    assert diff.mean() <= mean_tol and diff.max() <= max_tol


def test_jpeg_baseline_small_odd_matches_within_lossy_tolerance() -> None:
    reference, _ = _load("SC_rgb_small_odd.dcm")
    image, _ = _load("SC_rgb_small_odd_jpeg.dcm")
    assert np.abs(image - reference).max() <= 8


def test_jpeg_extended_12_bit_decodes() -> None:
    image, _ = _load("JPGExtended.dcm")
    assert image.shape == (1, 256, 1024, 1) and image.max() > 0


def test_deflated_explicit_little_endian_decodes() -> None:
    image, _ = _load("image_dfl.dcm")
    assert image.shape == (1, 512, 512, 1) and image.max() > 0
