"""The public description of one series a site can load."""

from __future__ import annotations

from dataclasses import dataclass

from medfed.data.assemble import SeriesPlan


@dataclass(frozen=True)
class Series:
    """One loadable series of a site.

    Attributes
    ----------
    series_uid : str
        DICOM SeriesInstanceUID (stays at the site).
    modality : str
        DICOM Modality, e.g. ``"CT"``.
    shape : tuple of int
        Channel-first volume shape ``(c, x, y, z)``: ``c`` samples per pixel
        (1 for grey, 3 for colour), ``x`` along image rows (columns of pixels),
        ``y`` down image columns, ``z`` along the slice normal.
    spacing : tuple of float
        Voxel size in mm along ``(x, y, z)``.
    slice_count : int
        Number of slices (frames), equal to ``shape[3]``.
    file_count : int
        Number of DICOM files the series is made of.
    geometry : str
        ``"patient"`` when positions/orientations came from the headers,
        ``"none"`` for images without patient geometry (identity orientation,
        slices stacked in InstanceNumber order).
    label_source : str or None
        ``"manifest"`` (NIfTI), ``"seg"`` (DICOM SEG) or ``None``.
    patient_id : str
        A key of the DICOM PatientID (:func:`medfed.data.headers.patient_key`), equal
        for a patient's series; ``""`` when unknown.
    """

    series_uid: str
    modality: str
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    slice_count: int
    file_count: int
    geometry: str
    label_source: str | None
    patient_id: str = ""


def series_from_plan(plan: SeriesPlan, *, label_source: str | None) -> Series:
    """Describe a planned series."""
    return Series(
        series_uid=plan.series_uid,
        modality=plan.modality,
        shape=plan.shape,
        spacing=plan.spacing,
        slice_count=len(plan.frames),
        file_count=len(plan.files),
        geometry=plan.geometry,
        label_source=label_source,
        patient_id=plan.patient_id,
    )


def label_source_of(plan: SeriesPlan, manifest_uids: set[str] | frozenset[str]) -> str | None:
    """Which label a series gets: the manifest's NIfTI first, else its SEG."""
    if plan.series_uid in manifest_uids:
        return "manifest"
    return "seg" if plan.seg_file else None
