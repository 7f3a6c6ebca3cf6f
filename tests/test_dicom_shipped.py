"""The DICOM reader on pydicom's shipped test files: decode, or skip with a reason."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.data import get_testdata_file

from medfed.core.errors import MedfedError
from medfed.data import DicomFolderSource, SkipReason, scan_folder

REASONS = {r.value for r in SkipReason}


TEST_FILES = Path(pydicom.data.__file__).parent / "test_files"


def _shipped(pattern: str = "*") -> list[Path]:
    """Files shipped inside pydicom (not the ones it would download)."""
    return sorted(p for p in TEST_FILES.glob(pattern) if p.is_file())


def _copy(names: list[Path], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for path in names:
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("path", _shipped("*.dcm"), ids=lambda p: p.name)
def test_each_shipped_file_decodes_or_is_reported(path: Path, tmp_path: Path) -> None:
    folder = _copy([path], tmp_path / "site")
    report = scan_folder(folder)
    assert report.files_total == 1
    if report.skipped:
        (item,) = report.skipped
        assert item.reason in REASONS
        assert report.series == ()
        return
    (summary,) = report.series
    source = DicomFolderSource(folder, cache_dir=tmp_path / "cache")
    (series,) = source.series()
    image, label = source.load(series.series_uid)
    assert tuple(image.shape) == summary.shape == series.shape
    assert image.dtype.is_floating_point and bool(image.isfinite().all())
    assert image.meta["space"] == "LPS"
    assert label is None


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("MR_truncated.dcm", SkipReason.TRUNCATED_PIXEL_DATA),
        ("rtplan.dcm", SkipReason.NO_PIXEL_DATA),
        ("rtstruct.dcm", SkipReason.NO_PIXEL_DATA),
        ("waveform_ecg.dcm", SkipReason.NO_PIXEL_DATA),
        ("badVR.dcm", SkipReason.INVALID_ATTRIBUTES),
        ("README.txt", SkipReason.NOT_DICOM),
        ("liver_1frame.dcm", SkipReason.UNMATCHED_SEG),
    ],
)
def test_known_bad_files_get_their_reason(name: str, reason: SkipReason, tmp_path: Path) -> None:
    report = scan_folder(_copy([Path(get_testdata_file(name))], tmp_path))
    assert [s.reason for s in report.skipped] == [reason.value]


def test_whole_folder_scan_accounts_for_every_file_without_identifiers(tmp_path: Path) -> None:
    files = _shipped("*")
    folder = _copy(files, tmp_path / "site")
    report = scan_folder(folder)
    assert report.files_total == len(files)
    in_series = sum(s.files for s in report.series)
    assert in_series + len(report.skipped) == len(files)
    text = json.dumps(report.to_dict()) + report.render_text()
    for path in files:
        if path.suffix != ".dcm":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            except Exception:
                continue
        for keyword in ("SeriesInstanceUID", "SOPInstanceUID", "PatientID", "StudyDate"):
            value = str(ds.get(keyword, "") or "")
            if len(value) >= 6:
                assert value not in text, keyword
        assert path.name not in text  # file names only with include_paths=True
    assert "MR_truncated.dcm" in report.render_text(include_paths=True)


def _pixel_span(path: Path) -> tuple[int, int]:
    """Byte offsets where the pixel data value starts and ends in the file."""
    data = path.read_bytes()
    pixels = pydicom.dcmread(path).PixelData
    start = data.find(pixels)
    return start, start + len(pixels)


@pytest.mark.parametrize("where", ["header", "pixel_start", "pixel_middle", "pixel_end"])
def test_truncated_copies_are_reported_never_crash(where: str, tmp_path: Path) -> None:
    source = Path(get_testdata_file("CT_small.dcm"))
    start, end = _pixel_span(source)
    cut = {
        "header": 400,
        "pixel_start": start + 10,
        "pixel_middle": (start + end) // 2,
        "pixel_end": end - 1,
    }[where]
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "cut.dcm").write_bytes(source.read_bytes()[:cut])
    report = scan_folder(folder)
    assert report.series == ()
    (item,) = report.skipped
    expected = {
        SkipReason.TRUNCATED_PIXEL_DATA.value,
        SkipReason.NO_PIXEL_DATA.value,
        SkipReason.UNREADABLE.value,
        SkipReason.INVALID_ATTRIBUTES.value,
    }
    assert item.reason in expected
    if where.startswith("pixel"):
        assert item.reason == SkipReason.TRUNCATED_PIXEL_DATA.value


def test_corrupt_compressed_stream_is_reported_and_load_raises_medfed_error(
    tmp_path: Path,
) -> None:
    data = bytearray(Path(get_testdata_file("MR_small_jp2klossless.dcm")).read_bytes())
    data[-3000:-2000] = bytes(1000)  # wipe part of the JPEG 2000 codestream
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "broken.dcm").write_bytes(bytes(data))
    report = scan_folder(folder)
    assert [s.reason for s in report.skipped] in (
        [SkipReason.DECODE_FAILED.value],
        [],  # should the decoder tolerate it, the image must still load
    )
    source = DicomFolderSource(folder, cache_dir=tmp_path / "cache")
    uids = [s.series_uid for s in source.series()]  # header-only index lists it
    if report.skipped:
        with pytest.raises(MedfedError, match="cannot be used"):
            source.load(uids[0])
    else:
        image, _ = source.load(uids[0])
        assert np.isfinite(image.numpy()).all()
