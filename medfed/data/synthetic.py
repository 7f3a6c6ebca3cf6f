"""Write synthetic DICOM series, multi-frame images and SEGs (tests, benchmarks, demos).

Volumes are given in the reader's ``(x, y, z)`` order; see
:mod:`medfed.data.geometry`. Nothing here is real patient data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass(frozen=True)
class SyntheticGeometry:
    """Where a synthetic volume sits: orientation, voxel size (x, y, z) and origin (LPS mm)."""

    orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def position(self, k: int) -> list[float]:
        """ImagePositionPatient of slice ``k``."""
        row = np.asarray(self.orientation[:3], float)
        col = np.asarray(self.orientation[3:], float)
        normal = np.cross(row, col)
        return [float(v) for v in np.asarray(self.origin) + k * self.spacing[2] * normal]

    def affine(self) -> np.ndarray:
        """The affine the reader should find (voxel (x, y, z) to LPS)."""
        out = np.eye(4)
        row = np.asarray(self.orientation[:3], float)
        col = np.asarray(self.orientation[3:], float)
        out[:3, 0] = row * self.spacing[0]
        out[:3, 1] = col * self.spacing[1]
        out[:3, 2] = np.cross(row, col) * self.spacing[2]
        out[:3, 3] = self.origin
        return out


def write_series(
    folder: Path,
    stored: np.ndarray,
    *,
    geometry: SyntheticGeometry,
    slope: float = 1.0,
    intercept: float = 0.0,
    series_uid: str | None = None,
    transfer_syntax: str = ExplicitVRLittleEndian,
    names: Sequence[str] | None = None,
    sop_uids: Sequence[str] | None = None,
    modality: str = "CT",
) -> list[Path]:
    """Write one single-frame file per slice of ``stored`` (int16 ``(x, y, z)``).

    Parameters
    ----------
    folder : Path
        Created if missing.
    stored : numpy.ndarray
        Stored pixel values; the reader returns ``stored * slope + intercept``.
    geometry : SyntheticGeometry
    slope, intercept : float
        RescaleSlope and RescaleIntercept.
    series_uid : str, optional
        Generated if omitted.
    transfer_syntax : str
        Native syntaxes, or a compressed one pydicom can encode (RLE Lossless,
        JPEG 2000 Lossless with pylibjpeg-openjpeg, JPEG-LS with pyjpegls).
    names : sequence of str, optional
        File name per slice (default ``slice_0000.dcm`` ...).
    sop_uids : sequence of str, optional
        SOPInstanceUID per slice (generated if omitted).
    modality : str

    Returns
    -------
    list of Path
        The files written, in slice order.
    """
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    study_uid = generate_uid()
    paths = []
    for k in range(stored.shape[2]):
        ds = _base(CT_IMAGE_STORAGE, modality, series_uid, study_uid)
        if sop_uids is not None:
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uids[k]
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = geometry.position(k)
        ds.ImageOrientationPatient = [float(v) for v in geometry.orientation]
        ds.PixelSpacing = [float(geometry.spacing[1]), float(geometry.spacing[0])]
        ds.SliceThickness = float(geometry.spacing[2])
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        _set_pixels(ds, np.ascontiguousarray(stored[:, :, k].T))
        path = folder / (names[k] if names is not None else f"slice_{k:04d}.dcm")
        _save(ds, path, transfer_syntax)
        paths.append(path)
    return paths


def _shared_groups(geometry: SyntheticGeometry) -> DicomSequence:
    """Orientation and pixel measures shared by every frame of a multi-frame object."""
    shared = Dataset()
    shared.PlaneOrientationSequence = _item(
        ImageOrientationPatient=[float(v) for v in geometry.orientation]
    )
    shared.PixelMeasuresSequence = _item(
        PixelSpacing=[float(geometry.spacing[1]), float(geometry.spacing[0])],
        SliceThickness=float(geometry.spacing[2]),
    )
    return DicomSequence([shared])


def write_multiframe(
    path: Path,
    stored: np.ndarray,
    *,
    geometry: SyntheticGeometry,
    slopes: Sequence[float],
    intercepts: Sequence[float],
    frame_order: Sequence[int] | None = None,
) -> Path:
    """Write an enhanced (multi-frame) CT with per-frame functional groups.

    Frame ``i`` holds slice ``frame_order[i]`` of ``stored`` with its own
    rescale (``slopes[k]``, ``intercepts[k]``), so the reader must use the
    per-frame groups to place and scale frames.
    """
    order = list(frame_order) if frame_order is not None else list(range(stored.shape[2]))
    ds = _base(ENHANCED_CT_STORAGE, "CT", generate_uid(), generate_uid())
    ds.NumberOfFrames = len(order)
    ds.SharedFunctionalGroupsSequence = _shared_groups(geometry)
    groups = []
    for k in order:
        group = Dataset()
        group.PlanePositionSequence = _item(ImagePositionPatient=geometry.position(k))
        group.PixelValueTransformationSequence = _item(
            RescaleSlope=float(slopes[k]), RescaleIntercept=float(intercepts[k]), RescaleType="HU"
        )
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    frames = np.stack([stored[:, :, k].T for k in order])
    _set_pixels(ds, np.ascontiguousarray(frames))
    _save(ds, path, ExplicitVRLittleEndian)
    return path


def write_seg(
    path: Path,
    labels: np.ndarray,
    *,
    geometry: SyntheticGeometry,
    series_uid: str,
    source_sops: Sequence[str] | None = None,
) -> Path:
    """Write a binary DICOM SEG for an int label volume ``(x, y, z)`` (0 = background).

    One frame per (segment, slice) that holds any voxel of the segment.
    Frames reference their slice by position, and also by source SOP instance
    when ``source_sops`` (one per slice) is given.
    """
    segments = [int(v) for v in np.unique(labels) if v != 0]
    ds = _base(SEG_STORAGE, "SEG", generate_uid(), generate_uid())
    ds.SegmentationType = "BINARY"
    ds.SegmentSequence = DicomSequence([_segment(number) for number in segments])
    ref = Dataset()
    ref.SeriesInstanceUID = series_uid
    ds.ReferencedSeriesSequence = DicomSequence([ref])
    ds.SharedFunctionalGroupsSequence = _shared_groups(geometry)
    frames, groups = [], []
    for number in segments:
        for k in range(labels.shape[2]):
            mask = labels[:, :, k] == number
            if not mask.any():
                continue
            frames.append(mask.T.astype(np.uint8))
            group = Dataset()
            group.PlanePositionSequence = _item(ImagePositionPatient=geometry.position(k))
            group.SegmentIdentificationSequence = _item(ReferencedSegmentNumber=number)
            if source_sops is not None:
                source = Dataset()
                source.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                source.ReferencedSOPInstanceUID = source_sops[k]
                derivation = Dataset()
                derivation.SourceImageSequence = DicomSequence([source])
                group.DerivationImageSequence = DicomSequence([derivation])
            groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = DicomSequence(groups)
    stack = np.stack(frames)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = stack.shape[1:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 1
    ds.HighBit = 0
    ds.PixelRepresentation = 0
    ds.PixelData = pack_bits(stack)
    _save(ds, path, ExplicitVRLittleEndian)
    return path


def _base(sop_class: str, modality: str, series_uid: str, study_uid: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientName = "Synthetic^Phantom"
    ds.PatientID = "SYNTH"
    return ds


def _set_pixels(ds: Dataset, pixels: np.ndarray) -> None:
    """Set integer pixel data from ``(rows, cols)`` or ``(frames, rows, cols)``."""
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    ds.PixelData = pixels.astype(pixels.dtype.newbyteorder("<")).tobytes()


def _save(ds: Dataset, path: Path, transfer_syntax: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    syntax = UID(transfer_syntax)
    if syntax.is_compressed:
        ds.compress(syntax)
    elif syntax != ExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
    ds.save_as(path, enforce_file_format=True)


def _item(**values: object) -> DicomSequence:
    item = Dataset()
    for key, value in values.items():
        setattr(item, key, value)
    return DicomSequence([item])


def _segment(number: int) -> Dataset:
    item = Dataset()
    item.SegmentNumber = number
    item.SegmentLabel = f"segment {number}"
    item.SegmentAlgorithmType = "MANUAL"
    return item
