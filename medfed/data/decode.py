"""Open DICOM files and decode their pixel data through pydicom's decoder plugins.

Compressed transfer syntaxes (RLE, JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, deflate) decode through whichever of pydicom's plugins are installed
(pydicom's own RLE decoder, pylibjpeg, pylibjpeg-openjpeg, Pillow, GDCM); so do
1-bit images and float / double-float pixel data (parametric maps). A private or
unknown transfer syntax, and 1-bit RLE (no decoder handles it), are reported as
unsupported before any decoding is tried.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from medfed.data.heal import describe
from medfed.data.records import SkipReason

_MAX_DETAIL = 160


class FileProblem(Exception):
    """A file cannot be used; carries the :class:`SkipReason` and a short detail.

    ``path`` (relative to the site folder) is set where one file of several failed.
    """

    def __init__(self, reason: SkipReason, detail: str = "", *, path: str = "") -> None:
        self.reason = reason
        self.detail = detail[:_MAX_DETAIL]
        self.path = path
        super().__init__(f"{reason.value}: {self.detail}")


def open_dataset(path: Path) -> Dataset:
    """Read a DICOM file, accepting files without the 128-byte preamble.

    Raises
    ------
    FileProblem
        ``NOT_DICOM`` when the bytes are not a DICOM data set, ``UNREADABLE``
        when the header is corrupt.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:
                # No preamble/meta: accept only if it reads as a plausible image header.
                ds = pydicom.dcmread(path, force=True)
                if not any(k in ds for k in ("SOPClassUID", "SeriesInstanceUID", "Modality")):
                    raise FileProblem(SkipReason.NOT_DICOM, "no DICOM preamble or header") from None
    except FileProblem:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise FileProblem(SkipReason.UNREADABLE, describe_error(exc)) from exc
    _ensure_transfer_syntax(ds)
    _check_known_syntax(transfer_syntax(ds))
    return ds


#: Names of the elements that can hold an image's pixels (PS3.5 8.1).
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def pixel_element(ds: Dataset) -> str | None:
    """Keyword of the element holding the pixels, or ``None`` when there is none."""
    return next((k for k in PIXEL_KEYWORDS if k in ds), None)


def transfer_syntax(ds: Dataset) -> UID:
    """Return the data set's transfer syntax UID (set by :func:`open_dataset`)."""
    return UID(ds.file_meta.TransferSyntaxUID)


def check_decodable(ds: Dataset) -> None:
    """Raise :class:`FileProblem` if no installed plugin can decode this syntax."""
    ts = transfer_syntax(ds)
    _check_known_syntax(ts)
    if not ts.is_compressed:
        return
    if ts == RLELossless and _int(ds.get("BitsAllocated", 8) or 8) == 1:
        raise FileProblem(
            SkipReason.UNSUPPORTED_SYNTAX,
            "1-bit RLE: no installed decoder handles RLE Lossless with 1 bit allocated; "
            "export the image uncompressed",
        )
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise FileProblem(SkipReason.UNSUPPORTED_SYNTAX, f"{ts.name}: no decoder exists") from exc
    if not decoder.is_available:
        raise FileProblem(
            SkipReason.UNSUPPORTED_SYNTAX,
            f"{ts.name}: no decoder plugin installed (pylibjpeg-*, python-gdcm or Pillow)",
        )


def decode_frames(ds: Dataset) -> np.ndarray:
    """Decode every frame, returned as ``(frames, rows, columns, samples)``.

    Values are the stored values (no rescale); YBR colour is converted to RGB and
    PALETTE COLOR expanded to RGB.

    Raises
    ------
    FileProblem
        ``TRUNCATED_PIXEL_DATA`` or ``DECODE_FAILED``.
    """
    check_decodable(ds)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
            if ds.get("PhotometricInterpretation") == "PALETTE COLOR":
                arr = apply_color_lut(arr, ds)
    except Exception as exc:  # decoder plugins raise ValueError/RuntimeError/...
        text = str(exc)
        reason = (
            SkipReason.TRUNCATED_PIXEL_DATA
            if "less than expected" in text or "truncated" in text.lower()
            else SkipReason.DECODE_FAILED
        )
        raise FileProblem(reason, describe_error(exc)) from exc
    try:
        n_frames = _int(ds.get("NumberOfFrames", 1) or 1)
        shape = (n_frames, _int(ds.Rows), _int(ds.Columns))
        arr = arr.reshape(*shape, -1)
    except (ValueError, TypeError, AttributeError) as exc:
        raise FileProblem(
            SkipReason.DECODE_FAILED,
            f"decoded {arr.size} values, which do not fill the frames the header describes "
            f"({describe_error(exc)})",
        ) from exc
    return np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))


def decode_file(path: Path) -> np.ndarray:
    """Open ``path`` and decode it: ``(frames, rows, columns, samples)``, stored values."""
    return decode_frames(open_dataset(path))


def _ensure_transfer_syntax(ds: Dataset) -> None:
    """Fill in a missing TransferSyntaxUID from how pydicom actually read the file."""
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        from pydicom.dataset import FileMetaDataset

        ds.file_meta = meta = FileMetaDataset()
    if "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if implicit:
        meta.TransferSyntaxUID = ImplicitVRLittleEndian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian


def _check_known_syntax(ts: UID) -> None:
    """Refuse a transfer syntax UID that is malformed, private or unknown to DICOM.

    pydicom reads such a file by guessing its encoding; its pixel data cannot be
    trusted, and ``UID.is_compressed`` would raise.
    """
    if ts.is_valid and ts.is_transfer_syntax:
        return
    kind = "a private or unknown" if ts.is_valid else "a malformed"
    raise FileProblem(
        SkipReason.UNSUPPORTED_SYNTAX,
        f"{str(ts)!r} is {kind} UID, not a DICOM transfer syntax; export the file in a "
        "standard one",
    )


def _int(value: object) -> int:
    return int(str(value).strip())


def describe_error(exc: BaseException) -> str:
    """One short line about an exception, without file paths (for a report's detail)."""
    return describe(exc)[:_MAX_DETAIL]
