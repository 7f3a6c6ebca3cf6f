"""Turn one file on disk into a :class:`FileRecord`, or say why it is skipped."""

from __future__ import annotations

import hashlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medfed.data.decode import (
    FileProblem,
    check_decodable,
    decode_frames,
    describe_error,
    open_dataset,
    pixel_element,
)
from medfed.data.records import FileRecord, FrameInfo, Skipped, SkipReason

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
log = logging.getLogger("medfed.data")
#: Attributes every DICOM object carries some of; a data set with none is no object.
_IDENTITY = ("SOPClassUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality")


def read_record(path: Path, root: Path, *, decode: bool = False) -> FileRecord | Skipped:
    """Read one file's header (and, with ``decode``, its pixels) into a record.

    Parameters
    ----------
    path : Path
        The file.
    root : Path
        The site folder; the record's path is relative to it.
    decode : bool
        Also decode the pixel data, to find corrupt compressed streams. Without
        it only the header, the decoder's availability and the length of
        uncompressed pixel data are checked.

    Returns
    -------
    FileRecord or Skipped
        Never raises for a bad file: every problem becomes a :class:`Skipped`, one
        nobody foresaw as ``UNEXPECTED`` with the exception's type (and a log line
        with its traceback, at the site).
    """
    rel = path.relative_to(root).as_posix()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns on odd values; problems are reported
        try:
            return _read(path, rel, decode=decode)
        except Exception as exc:  # a file never stops the scan of the others
            log.info("unexpected error reading %s", path, exc_info=True)
            return Skipped(rel, SkipReason.UNEXPECTED, describe_error(exc))


def _read(path: Path, rel: str, *, decode: bool) -> FileRecord | Skipped:
    try:
        stat = path.stat()
        ds = open_dataset(path)
        record = _record_from_dataset(ds, rel, stat)
        check_decodable(ds)
        _check_native_length(ds, record)
        if decode:
            decode_frames(ds)
    except FileProblem as problem:
        return Skipped(rel, problem.reason, problem.detail)
    except OSError as exc:
        return Skipped(rel, SkipReason.UNREADABLE, f"{type(exc).__name__}: cannot read file")
    return record


def patient_key(patient_id: str) -> str:
    """A stand-in for a DICOM PatientID that only groups scans: a SHA-256 prefix ("" if none).

    The index and the caches keep this, not the ID itself: grouping needs equality only.
    """
    value = patient_id.strip()
    return hashlib.sha256(value.encode()).hexdigest()[:20] if value else ""


def _record_from_dataset(ds: Dataset, rel: str, stat: os.stat_result) -> FileRecord:
    if pixel_element(ds) is None:
        if "Rows" in ds and "Columns" in ds:
            raise FileProblem(
                SkipReason.TRUNCATED_PIXEL_DATA, "image attributes present but pixel data missing"
            )
        if not any(k in ds for k in _IDENTITY):  # random bytes after a preamble, a cut file
            raise FileProblem(
                SkipReason.UNREADABLE,
                "no DICOM object in it: no SOP class, study, series or modality "
                "(damaged, cut short, or a fragment)",
            )
        raise FileProblem(SkipReason.NO_PIXEL_DATA, f"modality {ds.get('Modality', '?')}")
    try:
        for keyword in ("SeriesInstanceUID", "Rows", "Columns", "BitsAllocated"):
            if ds.get(keyword) in (None, ""):
                raise FileProblem(SkipReason.INVALID_ATTRIBUTES, f"{keyword} missing")
        n_frames = _number(ds, "NumberOfFrames", int, 1)
        is_seg = ds.get("SOPClassUID", "") == SEG_SOP_CLASS or ds.get("Modality") == "SEG"
        photometric = ds.get("PhotometricInterpretation", "")
        samples = 3 if photometric == "PALETTE COLOR" else _number(ds, "SamplesPerPixel", int, 1)
        return FileRecord(
            path=rel,
            size=stat.st_size,
            mtime_ns=stat.st_mtime_ns,
            series_uid=str(ds.SeriesInstanceUID),
            sop_uid=str(ds.get("SOPInstanceUID", "")),
            modality=str(ds.get("Modality", "OT") or "OT"),
            rows=_number(ds, "Rows", int, 0),
            columns=_number(ds, "Columns", int, 0),
            samples=samples,
            transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
            instance_number=_optional(ds, "InstanceNumber", int) or 0,
            slice_thickness=_optional(ds, "SliceThickness", float),
            spacing_between_slices=_optional(ds, "SpacingBetweenSlices", float),
            frames=_frames(ds, n_frames),
            is_seg=is_seg,
            referenced_series=tuple(
                str(item.SeriesInstanceUID)
                for item in ds.get("ReferencedSeriesSequence", [])
                if "SeriesInstanceUID" in item
            ),
            patient_id=patient_key(str(ds.get("PatientID", "") or "")),
        )
    except FileProblem:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError, OverflowError) as exc:
        # pydicom converts values lazily: a malformed one (an IS of '1A') raises here
        raise FileProblem(SkipReason.INVALID_ATTRIBUTES, describe_error(exc)) from exc


def _frames(ds: Dataset, n_frames: int) -> tuple[FrameInfo, ...]:
    """Per-frame geometry from functional groups, frame offsets or top-level tags."""
    shared = _first(ds, "SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if (
        per_frame is not None
        and len(per_frame) < n_frames
        or (per_frame is not None and len(per_frame) > n_frames and "NumberOfFrames" in ds)
    ):
        raise FileProblem(
            SkipReason.INVALID_ATTRIBUTES,
            f"{len(per_frame)} per-frame groups for {n_frames} frames",
        )
    base_position = _vec(ds.get("ImagePositionPatient"))
    base_orientation = _vec(ds.get("ImageOrientationPatient"))
    base_spacing = _vec(ds.get("PixelSpacing")) or _vec(ds.get("ImagerPixelSpacing"))
    slope, intercept = _rescale(ds)
    legacy_positions = _legacy_positions(ds, n_frames, base_position, base_orientation)
    # Without NumberOfFrames (one frame), extra per-frame groups are ignored.
    frames = []
    for k in range(n_frames):
        group = per_frame[k] if per_frame is not None else None
        position = _macro(group, shared, "PlanePositionSequence", "ImagePositionPatient")
        orientation = _macro(group, shared, "PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = _macro(group, shared, "PixelMeasuresSequence", "PixelSpacing")
        value = _macro_item(group, shared, "PixelValueTransformationSequence")
        k_slope, k_intercept = _rescale(value) if value is not None else (slope, intercept)
        segment = _macro_item(group, shared, "SegmentIdentificationSequence")
        frames.append(
            FrameInfo(
                position=_vec(position) or legacy_positions[k],
                orientation=_vec(orientation) or base_orientation,
                pixel_spacing=_vec(spacing) or base_spacing,
                slope=k_slope,
                intercept=k_intercept,
                segment=int(segment.ReferencedSegmentNumber) if segment is not None else None,
                source_sop=_source_sop(group),
            )
        )
    return tuple(frames)


def _legacy_positions(ds: Dataset, n_frames: int, position: Any, orientation: Any) -> list[Any]:
    """Frame positions from the top-level position plus frame offsets along the normal.

    Uses GridFrameOffsetVector (RT dose), else SpacingBetweenSlices or
    SliceThickness; ``None`` per frame where the geometry is unknown.
    """
    if n_frames == 1:
        return [position]
    if position is None or orientation is None:
        return [None] * n_frames
    grid = ds.get("GridFrameOffsetVector")
    if grid is not None and len(grid) == n_frames:
        values = np.asarray([float(v) for v in grid])
        offsets = values - values[0]
    else:
        step = _optional(ds, "SpacingBetweenSlices", float) or _optional(
            ds, "SliceThickness", float
        )
        if step is None:
            return [None] * n_frames
        offsets = step * np.arange(n_frames)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.asarray(position)
    return [tuple(float(v) for v in origin + d * normal) for d in offsets]


def _rescale(item: Dataset) -> tuple[float, float]:
    slope = _number(item, "RescaleSlope", float, None)
    if slope is None and item.get("Modality") == "RTDOSE":
        slope = _number(item, "DoseGridScaling", float, None)
    intercept = _number(item, "RescaleIntercept", float, None)
    return (1.0 if slope is None else slope, 0.0 if intercept is None else intercept)


def _first(ds: Dataset | None, keyword: str) -> Dataset | None:
    if ds is None:
        return None
    seq = ds.get(keyword)
    return seq[0] if seq else None


def _macro_item(group: Dataset | None, shared: Dataset | None, keyword: str) -> Dataset | None:
    return _first(group, keyword) or _first(shared, keyword)


def _macro(group: Dataset | None, shared: Dataset | None, seq: str, keyword: str) -> Any:
    item = _macro_item(group, shared, seq)
    return None if item is None else item.get(keyword)


def _source_sop(group: Dataset | None) -> str | None:
    derivation = _first(group, "DerivationImageSequence")
    source = _first(derivation, "SourceImageSequence")
    if source is None or "ReferencedSOPInstanceUID" not in source:
        return None
    return str(source.ReferencedSOPInstanceUID)


def _check_native_length(ds: Dataset, record: FileRecord) -> None:
    if UID(record.transfer_syntax).is_compressed:
        return
    bits = _number(ds, "BitsAllocated", int, 0)
    samples = _number(ds, "SamplesPerPixel", int, 1)
    n_values = record.rows * record.columns * samples * len(record.frames)
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        n_values = n_values * 2 // 3
    expected = math.ceil(n_values * bits / 8)
    actual = len(ds[pixel_element(ds) or "PixelData"].value or b"")
    if actual < expected:
        deflated = record.transfer_syntax == DeflatedExplicitVRLittleEndian
        raise FileProblem(
            SkipReason.TRUNCATED_PIXEL_DATA,
            f"{actual} of {expected} pixel bytes present"
            + (" (its deflated data set is damaged or cut short)" if deflated else ""),
        )


def _vec(value: Any) -> Any:
    """Tuple of floats for a multi-valued DS, or ``None``."""
    if value is None or value == "":
        return None
    try:
        return tuple(float(v) for v in value)
    except TypeError:
        return None


def _number(ds: Dataset, keyword: str, kind: type[Any], default: Any) -> Any:
    """``keyword``'s value as ``kind`` (int or float), ``default`` when absent or empty.

    Raises
    ------
    FileProblem
        ``INVALID_ATTRIBUTES`` naming the attribute and its malformed value (an IS
        of '1A'), which pydicom, converting lazily, raises on at first access.
    """
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom's lazy value conversion: ValueError, TypeError, ...
        value = _raw_text(ds, keyword)
    if value is None or value == "":
        return default
    try:
        return kind(str(value).strip())
    except (ValueError, OverflowError):
        expected = "a whole number" if kind is int else "a number"
        raise FileProblem(
            SkipReason.INVALID_ATTRIBUTES, f"{keyword} is {str(value)[:40]!r}, expected {expected}"
        ) from None


def _optional(ds: Dataset, keyword: str, kind: type[Any]) -> Any:
    """Like :func:`_number`; a malformed value counts as absent.

    For attributes a volume can do without (InstanceNumber, SliceThickness).
    """
    try:
        return _number(ds, keyword, kind, None)
    except FileProblem:
        return None


def _raw_text(ds: Dataset, keyword: str) -> str:
    """The undecoded text of an element whose value pydicom cannot convert."""
    raw = ds.get_item(keyword)
    value = getattr(raw, "value", None)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\0 ")
    return "" if value is None else str(value)
