"""Open DICOM files and decode their pixel data through pydicom's decoder plugins.

Compressed transfer syntaxes (RLE, JPEG baseline/extended/lossless, JPEG-LS,
JPEG 2000, deflate) decode through whichever of pydicom's plugins are installed
(pydicom's own RLE decoder, pylibjpeg, pylibjpeg-openjpeg, Pillow, GDCM).
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
)

from medfed.data.records import SkipReason

_MAX_DETAIL = 160


class FileProblem(Exception):
    """A file cannot be used; carries the :class:`SkipReason` and a short detail."""

    def __init__(self, reason: SkipReason, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail[:_MAX_DETAIL]
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
                    raise FileProblem(
                        SkipReason.NOT_DICOM, "no DICOM preamble or header") from None
    except FileProblem:
        raise
    except Exception as exc:  # pydicom raises many types on corrupt headers
        raise FileProblem(SkipReason.UNREADABLE, _describe(exc)) from exc
    _ensure_transfer_syntax(ds)
    return ds


def transfer_syntax(ds: Dataset) -> UID:
    """Return the data set's transfer syntax UID (set by :func:`open_dataset`)."""
    return UID(ds.file_meta.TransferSyntaxUID)


def check_decodable(ds: Dataset) -> None:
    """Raise :class:`FileProblem` if no installed plugin can decode this syntax."""
    ts = transfer_syntax(ds)
    if not ts.is_compressed:
        return
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
        raise FileProblem(reason, _describe(exc)) from exc
    n_frames = _int(ds.get("NumberOfFrames", 1) or 1)
    arr = arr.reshape(n_frames, int(ds.Rows), int(ds.Columns), -1)
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


def _int(value: object) -> int:
    return int(str(value).strip())


def _describe(exc: BaseException) -> str:
    """One line about an exception, without file paths."""
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}"[:_MAX_DETAIL]
