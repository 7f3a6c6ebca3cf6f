"""Write and read the synthetic MR series (one DICOM file per slice) with pydicom."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from medfed.core.errors import MedfedError
from medfed.synth.geometry import SeriesGeometry
from medfed.synth.profiles import ScannerProfile

#: Manufacturer written to every file, so no one mistakes these for scanner output.
MANUFACTURER = "medfed-synth"


def synth_uid(seed: int, *parts: str) -> str:
    """Return a deterministic, valid DICOM UID (pydicom root + hash of seed and parts)."""
    return str(generate_uid(entropy_srcs=["medfed-synth", f"seed={seed}", *parts]))


@dataclass(frozen=True)
class SeriesIds:
    """Identifiers of one synthetic subject's study and series."""

    patient_id: str
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    study_date: str


def _ds(value: float) -> str:
    """Format a number as an exact, short DICOM decimal string (grid values are 1e-4 mm)."""
    text = f"{round(float(value), 4):.4f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def series_ids(*, seed: int, site: str, subject: str, subject_index: int) -> SeriesIds:
    """Return the deterministic identifiers of a subject (a function of seed, site, subject)."""
    date = dt.date(2024, 1, 1) + dt.timedelta(days=subject_index)
    return SeriesIds(
        patient_id=subject,
        study_uid=synth_uid(seed, site, subject, "study"),
        series_uid=synth_uid(seed, site, subject, "series"),
        frame_of_reference_uid=synth_uid(seed, site, subject, "frame"),
        study_date=date.strftime("%Y%m%d"),
    )


def write_series(
    directory: Path,
    *,
    stored: np.ndarray,
    slope: float,
    intercept: float,
    geometry: SeriesGeometry,
    ids: SeriesIds,
    profile: ScannerProfile,
    seed: int,
    institution: str,
) -> list[Path]:
    """Write ``stored`` (uint16, axes (i, j, k)) as one MR file per slice; return the paths."""
    if stored.shape != geometry.shape or stored.dtype != np.uint16:
        raise ValueError(f"stored array {stored.shape} {stored.dtype} does not fit {geometry}")
    directory.mkdir(parents=True, exist_ok=True)
    cols, rows, slices = geometry.shape
    di, dj, dk = geometry.spacing
    iop = [_ds(v) for v in (*geometry.row_cosine, *geometry.col_cosine)]
    centre = float(slope) * 2048 + intercept
    paths = []
    for k in range(slices):
        sop_uid = synth_uid(seed, institution, ids.patient_id, "sop", str(k))
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = pydicom.uid.UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["DERIVED", "SECONDARY", "OTHER"]
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = pydicom.uid.UID(sop_uid)
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ids.study_date
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = "090000"
        ds.AccessionNumber = ""
        ds.Modality = "MR"
        ds.Manufacturer = MANUFACTURER
        ds.InstitutionName = institution
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "medfed synthetic brain MRI"
        ds.SeriesDescription = f"SYNTHETIC {profile.contrast} {profile.name}"
        ds.ManufacturerModelName = profile.name
        ds.PatientName = ids.patient_id
        ds.PatientID = ids.patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.PatientIdentityRemoved = "YES"
        ds.DeidentificationMethod = "synthetic data; no real person"
        ds.BodyPartExamined = "BRAIN"
        ds.ScanningSequence = "SE" if profile.contrast == "T2w" else "GR"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D" if profile.slice_spacing_mm > profile.in_plane_mm else "3D"
        ds.SliceThickness = _ds(geometry.slice_thickness)
        ds.SpacingBetweenSlices = _ds(dk)
        ds.RepetitionTime = _ds(profile.repetition_time_ms)
        ds.EchoTime = _ds(profile.echo_time_ms)
        ds.MagneticFieldStrength = _ds(profile.field_strength_t)
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = ids.study_uid
        ds.SeriesInstanceUID = ids.series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        pos = geometry.slice_position(k)
        ds.ImagePositionPatient = [_ds(v) for v in pos]
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = ids.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds(float(np.dot(pos, geometry.normal)))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.PixelSpacing = [_ds(dj), _ds(di)]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = _ds(centre)
        ds.WindowWidth = _ds(2 * centre)
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = repr(float(slope))
        ds.BurnedInAnnotation = "NO"
        ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
        path = directory / f"IM-{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def read_series(directory: Path) -> tuple[np.ndarray, SeriesGeometry, str]:
    """Read a series back: ``(volume float32 (i, j, k) rescaled, geometry, SeriesInstanceUID)``.

    Slices are sorted by the projection of ImagePositionPatient on the slice normal.
    """
    files = sorted(Path(directory).glob("*.dcm"))
    if not files:
        raise MedfedError(
            "no DICOM files found for this subject",
            where=str(directory),
            expected="IM-0001.dcm ... written by `medfed data synth`",
            fix="re-run `medfed data synth` into an empty folder",
        )
    slices = [pydicom.dcmread(f) for f in files]
    uids = {str(s.SeriesInstanceUID) for s in slices}
    if len(uids) != 1:
        raise MedfedError(
            f"{len(uids)} series mixed in one subject folder",
            where=str(directory),
            expected="one SeriesInstanceUID per subject folder",
        )
    first = slices[0]
    iop = np.asarray(first.ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    slices.sort(key=lambda s: float(np.dot(np.asarray(s.ImagePositionPatient, float), normal)))
    pos = np.asarray([s.ImagePositionPatient for s in slices], dtype=float)
    dk = (
        float(np.mean(np.diff(pos @ normal)))
        if len(slices) > 1
        else float(getattr(first, "SpacingBetweenSlices", first.SliceThickness))
    )
    dj, di = (float(v) for v in first.PixelSpacing)
    vol = np.stack(
        [
            s.pixel_array.T.astype(np.float32) * float(s.RescaleSlope) + float(s.RescaleIntercept)
            for s in slices
        ],
        axis=-1,
    )
    geometry = SeriesGeometry(
        shape=(int(first.Columns), int(first.Rows), len(slices)),
        spacing=(di, dj, dk),
        origin_lps=(float(pos[0, 0]), float(pos[0, 1]), float(pos[0, 2])),
        row_cosine=(float(iop[0]), float(iop[1]), float(iop[2])),
        col_cosine=(float(iop[3]), float(iop[4]), float(iop[5])),
        slice_thickness=float(first.SliceThickness),
    )
    return vol, geometry, uids.pop()
