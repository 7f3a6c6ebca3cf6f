"""A DICOM folder never takes a site down: every file pydicom and pydicom-data ship,
unusual files and damaged copies (tests/dicom_zoo.py) give a scan that exits 0 with
every file accounted for, the pixel values plain pydicom decodes, and a folder source
that yields every series that decodes."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.data
import pytest
from dicom_zoo import MADE, build_zoo
from pydicom.pixels import apply_color_lut

from medfed.cli.main import main
from medfed.core.config import DataSourceConfig
from medfed.data import DicomFolderSource, SkipReason, headers, scan_folder
from medfed.data.decode import decode_file
from medfed.data.scan import short_hash
from medfed.tasks.imaging import dicom_subjects

#: Reasons that say medfed could not decode the pixels.
DECODE_REASONS = {
    SkipReason.DECODE_FAILED.value,
    SkipReason.TRUNCATED_PIXEL_DATA.value,
    SkipReason.UNSUPPORTED_SYNTAX.value,
    SkipReason.UNEXPECTED.value,
}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The folder and every file's path relative to it."""
    folder = tmp_path_factory.mktemp("zoo") / "dicom"
    files = build_zoo(folder)
    return folder, sorted(p.relative_to(folder).as_posix() for p in files)


@pytest.fixture(scope="module")
def scanned(
    zoo: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[int, str, dict[str, Any]]:
    """`medfed site scan` on the zoo: exit code, everything printed, the JSON report.

    (Module-scoped, so it captures output itself: capsys is per test.)
    """
    folder, _ = zoo
    site = tmp_path_factory.mktemp("site")
    config = site / "site.toml"
    config.write_text(
        f'[site]\nname = "zoo"\n[data]\nkind = "dicom-folder"\npath = "{folder}"\n'
        f'cache_dir = "{site / "cache"}"\n'
    )
    out, err = io.StringIO(), io.StringIO()
    with (
        contextlib.redirect_stdout(out),
        contextlib.redirect_stderr(err),
        pytest.raises(SystemExit) as done,
    ):
        main(["site", "scan", "--config", str(config)])
    report = json.loads((site / "scan-report.json").read_text())
    return int(done.value.code or 0), out.getvalue() + err.getvalue(), report


def test_site_scan_exits_0_without_a_traceback_and_accounts_for_every_file(
    zoo: tuple[Path, list[str]], scanned: tuple[int, str, dict[str, Any]]
) -> None:
    _, files = zoo
    code, printed, report = scanned
    assert code == 0, printed
    assert "Traceback" not in printed
    assert report["files_total"] == len(files) > 250
    in_series = sum(s["files"] for s in report["series"])
    assert in_series + report["files_skipped"] == len(files)
    ids = {short_hash(rel) for rel in files}
    assert {s["file"] for s in report["skipped"]} <= ids
    assert set(report["skipped_by_reason"]) <= {r.value for r in SkipReason}
    assert SkipReason.UNEXPECTED.value not in report["skipped_by_reason"], report["skipped"]
    assert all(
        s["detail"] or s["reason"] == SkipReason.NO_PIXEL_DATA.value
        for s in report["skipped"]
        if s["reason"] != SkipReason.UNMATCHED_SEG.value
    )


def test_each_made_file_gets_the_outcome_that_names_its_problem(
    scanned: tuple[int, str, dict[str, Any]],
) -> None:
    _, _, report = scanned
    skipped = {s["file"]: s for s in report["skipped"]}
    for name, (outcome, phrase) in MADE.items():
        entry = skipped.get(short_hash(f"made/{name}"))
        if outcome == "series":
            assert entry is None, (name, entry)
            continue
        assert entry is not None, name
        assert entry["reason"] == outcome and phrase in entry["detail"], (name, entry)


def _plain_pydicom(path: Path) -> np.ndarray | None:
    """What pydicom alone, with the installed plugins, decodes from ``path`` (or None)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(path)
            arr = ds.pixel_array
            if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
            return arr
    except Exception:  # noqa: BLE001 - whatever pydicom refuses, medfed may refuse too
        return None


def test_medfed_decodes_every_file_plain_pydicom_decodes_with_identical_values(
    zoo: tuple[Path, list[str]], scanned: tuple[int, str, dict[str, Any]]
) -> None:
    folder, files = zoo
    skipped = {s["file"]: s for s in scanned[2]["skipped"]}
    compared = 0
    for rel in files:
        expected = _plain_pydicom(folder / rel)
        if expected is None:
            continue
        decoded = decode_file(folder / rel)  # raises FileProblem if medfed cannot
        assert decoded.size == expected.size, rel
        np.testing.assert_array_equal(decoded.reshape(-1), expected.reshape(-1), err_msg=rel)
        entry = skipped.get(short_hash(rel))
        assert entry is None or entry["reason"] not in DECODE_REASONS, (rel, entry)
        compared += 1
    assert compared > 100
    for name in (
        "float_parametric_map.dcm",
        "double_float_parametric_map.dcm",
        "one_bit_native.dcm",
        "image_dfl.dcm",
    ):  # float, 1-bit, deflated
        assert any(
            rel.endswith(name) for rel in files if _plain_pydicom(folder / rel) is not None
        ), name


def test_the_folder_source_yields_every_series_that_decodes(
    zoo: tuple[Path, list[str]],
    scanned: tuple[int, str, dict[str, Any]],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    folder, _ = zoo
    source = DataSourceConfig(
        kind="dicom-folder", path=str(folder), cache_dir=str(tmp_path / "cache")
    )
    with caplog.at_level(logging.WARNING, logger="medfed.tasks"):
        subjects = dicom_subjects(source)
    decoded = scanned[2]["series"]  # the scan decoded every file
    assert sorted(short_hash(s.key) for s in subjects) == sorted(s["series_id"] for s in decoded)
    assert all(bool(s.image.isfinite().all()) for s in subjects)
    # the headers list a series whose JPEG 2000 stream is garbage; it is left out, said so
    assert "series left out" in caplog.text and "pixel decode failed" in caplog.text


def test_a_file_whose_pixels_do_not_decode_is_set_aside_and_its_series_assembled_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Both files are one series (same UID, no positions); the second's JPEG 2000 stream
    # is broken, which a header-only index cannot see.
    folder = tmp_path / "site"
    folder.mkdir()
    for name in ("JPEG2000.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"):
        shutil.copyfile(pydicom.data.get_testdata_file(name), folder / name)
    source = DicomFolderSource(folder, cache_dir=tmp_path / "cache")
    (series,) = source.series()
    assert series.shape[-1] == 2
    with caplog.at_level(logging.WARNING, logger="medfed.data"):
        image, _ = source.load(series.series_uid)
    assert tuple(image.shape) == (1, 256, 1024, 1)  # the file that decodes
    assert "left out: pixel decode failed" in caplog.text
    report = scan_folder(folder)  # the scan, decoding, finds the same series
    assert [s.shape for s in report.series] == [tuple(image.shape)]


def test_an_error_nobody_foresaw_is_reported_with_its_type_and_the_rest_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    for name in ("CT_small.dcm", "MR_small.dcm"):
        shutil.copyfile(pydicom.data.get_testdata_file(name), folder / name)

    class PluginBug(Exception):
        pass

    real = headers.decode_frames

    def flaky(ds: pydicom.Dataset) -> np.ndarray:
        if ds.Modality == "CT":
            raise PluginBug("a decoder plugin fell over")
        return real(ds)

    monkeypatch.setattr(headers, "decode_frames", flaky)
    report = scan_folder(folder)
    (skipped,) = report.skipped
    assert skipped.path == "CT_small.dcm" and skipped.reason == SkipReason.UNEXPECTED.value
    assert skipped.detail == "PluginBug: a decoder plugin fell over"
    assert [s.modality for s in report.series] == ["MR"]
