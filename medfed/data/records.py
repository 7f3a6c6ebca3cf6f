"""Header-level records of the files in a site folder, and why a file was skipped.

A :class:`FileRecord` holds what the reader needs from one DICOM file's header to
place its frames in a volume, without its pixels. Records round-trip through
plain JSON (``to_json`` / ``from_json``) so the folder index can be cached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

Vec3 = tuple[float, float, float]
Orientation = tuple[float, float, float, float, float, float]


class SkipReason(str, Enum):
    """Why a file (or every file of a series) was left out."""

    NOT_DICOM = "not DICOM"
    UNREADABLE = "unreadable header"
    NO_PIXEL_DATA = "no pixel data"
    INVALID_ATTRIBUTES = "missing or invalid image attributes"
    TRUNCATED_PIXEL_DATA = "truncated pixel data"
    UNSUPPORTED_SYNTAX = "unsupported transfer syntax"
    DECODE_FAILED = "pixel decode failed"
    INCONSISTENT_GEOMETRY = "inconsistent geometry"
    DUPLICATE_POSITIONS = "duplicate slice positions"
    MISSING_SLICES = "missing slices"
    INCONSISTENT_SPACING = "inconsistent spacing"
    UNMATCHED_SEG = "segmentation matches no series"
    INVALID_SEG = "invalid segmentation"
    DUPLICATE_LABEL = "second label for a series"
    #: Anything the reader did not foresee; the detail names the exception type.
    UNEXPECTED = "unexpected error"


@dataclass(frozen=True)
class Skipped:
    """One file left out, with the reason and a short detail free of identifiers."""

    path: str
    reason: SkipReason
    detail: str = ""


@dataclass(frozen=True)
class FrameInfo:
    """Geometry and value mapping of one frame (one slice) of a file.

    ``position`` and ``orientation`` are ``None`` for images without patient
    geometry (secondary capture, ultrasound). For SEG frames ``segment`` is the
    referenced segment number and ``source_sop`` the source image's SOP instance.
    """

    position: Vec3 | None
    orientation: Orientation | None
    pixel_spacing: tuple[float, float] | None
    slope: float = 1.0
    intercept: float = 0.0
    segment: int | None = None
    source_sop: str | None = None


@dataclass(frozen=True)
class FileRecord:
    """What the reader keeps of one readable, pixel-bearing DICOM file.

    ``path`` is relative to the site folder; ``size`` and ``mtime_ns`` identify the
    version of the file the record was made from.
    """

    path: str
    size: int
    mtime_ns: int
    series_uid: str
    sop_uid: str
    modality: str
    rows: int
    columns: int
    samples: int
    transfer_syntax: str
    instance_number: int
    slice_thickness: float | None
    spacing_between_slices: float | None
    frames: tuple[FrameInfo, ...]
    is_seg: bool = False
    referenced_series: tuple[str, ...] = field(default_factory=tuple)
    #: :func:`medfed.data.headers.patient_key` of the DICOM PatientID ("" when absent):
    #: groups a patient's scans without keeping the ID.
    patient_id: str = ""

    def to_json(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> FileRecord:
        """Rebuild a record written by :meth:`to_json`."""
        frames = tuple(
            FrameInfo(
                position=_tuple_or_none(f["position"]),
                orientation=_tuple_or_none(f["orientation"]),
                pixel_spacing=_tuple_or_none(f["pixel_spacing"]),
                slope=float(f["slope"]),
                intercept=float(f["intercept"]),
                segment=f["segment"],
                source_sop=f["source_sop"],
            )
            for f in data["frames"]
        )
        values = {k: v for k, v in data.items() if k not in ("frames", "referenced_series")}
        return cls(**values, frames=frames, referenced_series=tuple(data["referenced_series"]))


def skipped_to_json(item: Skipped) -> dict[str, str]:
    """Return a JSON-serialisable dict for a :class:`Skipped`."""
    return {"path": item.path, "reason": item.reason.name, "detail": item.detail}


def skipped_from_json(data: dict[str, str]) -> Skipped:
    """Rebuild a :class:`Skipped` written by :func:`skipped_to_json`."""
    return Skipped(path=data["path"], reason=SkipReason[data["reason"]], detail=data["detail"])


def _tuple_or_none(value: Any) -> Any:
    return None if value is None else tuple(float(v) for v in value)
