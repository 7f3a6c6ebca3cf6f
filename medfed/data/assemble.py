"""Group file records into series and lay their frames out as regular volumes."""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from medfed.data.decode import describe_error
from medfed.data.geometry import (
    AXIAL,
    GeometryProblem,
    build_affine,
    same_orientation,
    slice_normal,
    stack_slices,
)
from medfed.data.records import FileRecord, FrameInfo, Skipped, SkipReason

log = logging.getLogger("medfed.data")


@dataclass(frozen=True)
class FrameRef:
    """One slice of a volume: which file, which frame in it, and its rescale."""

    path: str
    index: int
    slope: float
    intercept: float


@dataclass(frozen=True)
class SeriesPlan:
    """Everything needed to decode a series into a volume, without pixels.

    ``frames`` are in ``z`` order; ``affine`` follows the convention of
    :mod:`medfed.data.geometry` (voxel ``(x, y, z)`` to LPS mm).
    """

    series_uid: str
    modality: str
    rows: int
    columns: int
    samples: int
    frames: tuple[FrameRef, ...]
    affine: np.ndarray = field(compare=False, repr=False)
    spacing: tuple[float, float, float]
    geometry: str
    files: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    sop_to_slice: dict[str, int] = field(compare=False, repr=False)
    seg_file: str | None = None
    #: The series' patient (a key of its DICOM PatientID); "" when absent or when its
    #: files disagree.
    patient_id: str = ""

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Channel-first volume shape ``(samples, x, y, z)``."""
        return (self.samples, self.columns, self.rows, len(self.frames))


def assemble(records: Iterable[FileRecord]) -> tuple[list[SeriesPlan], list[Skipped]]:
    """Group records by SeriesInstanceUID, order and check each series, attach SEGs.

    Returns
    -------
    plans : list of SeriesPlan
        One per usable image series, sorted by series UID.
    skipped : list of Skipped
        Every file of an unusable series, and SEG files that match no series.
    """
    images: dict[str, list[FileRecord]] = defaultdict(list)
    segs: list[FileRecord] = []
    for record in records:
        (segs if record.is_seg else images[record.series_uid]).append(record)
    plans: dict[str, SeriesPlan] = {}
    skipped: list[Skipped] = []
    for uid in sorted(images):
        group = sorted(images[uid], key=lambda r: r.path)
        try:
            plans[uid] = plan_series(group)
        except GeometryProblem as problem:
            skipped.extend(Skipped(r.path, problem.reason, problem.detail) for r in group)
        except Exception as exc:  # one odd series never stops the others
            # the traceback for a bug report; the report line carries the exception
            log.info("unexpected error assembling a series of %d files", len(group), exc_info=True)
            detail = f"assembling its series: {describe_error(exc)}"
            skipped.extend(Skipped(r.path, SkipReason.UNEXPECTED, detail) for r in group)
    for seg in sorted(segs, key=lambda r: r.path):
        try:
            target = _seg_target(seg, plans)
        except Exception as exc:
            log.info("unexpected error matching a SEG to its series", exc_info=True)
            skipped.append(
                Skipped(
                    seg.path,
                    SkipReason.UNEXPECTED,
                    f"matching it to a series: {describe_error(exc)}",
                )
            )
            continue
        if target is None:
            skipped.append(
                Skipped(seg.path, SkipReason.UNMATCHED_SEG, "no referenced series found")
            )
        elif plans[target].seg_file is not None:
            skipped.append(
                Skipped(seg.path, SkipReason.DUPLICATE_LABEL, "series already has a SEG")
            )
        else:
            plans[target] = replace(plans[target], seg_file=seg.path)
    return [plans[uid] for uid in sorted(plans)], skipped


def plan_series(group: list[FileRecord]) -> SeriesPlan:
    """Order the frames of one series' files and compute its geometry.

    Raises
    ------
    GeometryProblem
        Mixed slice sizes or orientations, duplicate positions, missing slices
        or uneven spacing.
    """
    first = group[0]
    size = (first.rows, first.columns, first.samples)
    if any((r.rows, r.columns, r.samples) != size for r in group):
        raise GeometryProblem(SkipReason.INCONSISTENT_GEOMETRY, "slices differ in size")
    items: list[tuple[FileRecord, int, FrameInfo]] = [
        (r, k, f) for r in group for k, f in enumerate(r.frames)
    ]
    with_position = [f.position is not None and f.orientation is not None for _, _, f in items]
    fallback = first.spacing_between_slices or first.slice_thickness
    spacing_2d = items[0][2].pixel_spacing or (1.0, 1.0)
    if any(f.pixel_spacing != items[0][2].pixel_spacing for _, _, f in items):
        raise GeometryProblem(
            SkipReason.INCONSISTENT_GEOMETRY, "pixel spacing differs between slices"
        )
    if all(with_position):
        orientations = [f.orientation for _, _, f in items if f.orientation is not None]
        orientation = orientations[0]
        if any(not same_orientation(o, orientation) for o in orientations):
            raise GeometryProblem(SkipReason.INCONSISTENT_GEOMETRY, "slice orientations differ")
        stack = stack_slices(
            [f.position for _, _, f in items],  # type: ignore[misc]
            orientation,
            fallback_spacing=fallback,
        )
        ordered = [items[i] for i in stack.order]
        origin = ordered[0][2].position
        step, z_spacing, geometry = stack.step, stack.spacing, "patient"
    elif not any(with_position):
        orientation = items[0][2].orientation or AXIAL
        ordered = sorted(items, key=lambda it: (it[0].instance_number, it[0].path, it[1]))
        z_spacing = fallback if fallback and fallback > 0 else 1.0
        origin, step, geometry = (0.0, 0.0, 0.0), slice_normal(orientation) * z_spacing, "none"
    else:
        raise GeometryProblem(
            SkipReason.INCONSISTENT_GEOMETRY, "some slices lack ImagePositionPatient"
        )
    assert origin is not None
    return SeriesPlan(
        series_uid=first.series_uid,
        modality=first.modality,
        rows=first.rows,
        columns=first.columns,
        samples=first.samples,
        frames=tuple(FrameRef(r.path, k, f.slope, f.intercept) for r, k, f in ordered),
        affine=build_affine(orientation, spacing_2d, origin, step),
        spacing=(float(spacing_2d[1]), float(spacing_2d[0]), float(z_spacing)),
        geometry=geometry,
        files=tuple(r.path for r in group),
        transfer_syntaxes=tuple(sorted({r.transfer_syntax for r in group})),
        sop_to_slice={
            r.sop_uid: z for z, (r, _, _) in enumerate(ordered) if len(r.frames) == 1 and r.sop_uid
        },
        patient_id=_one_patient(group),
    )


def _one_patient(records: list[FileRecord]) -> str:
    """The PatientID all the series' files share, or "" (unknown) when they do not."""
    ids = {r.patient_id for r in records}
    return ids.pop() if len(ids) == 1 else ""


def _seg_target(seg: FileRecord, plans: dict[str, SeriesPlan]) -> str | None:
    """The series a SEG labels: by ReferencedSeriesSequence, else by source SOP UIDs."""
    for uid in seg.referenced_series:
        if uid in plans:
            return uid
    sources = {f.source_sop for f in seg.frames if f.source_sop}
    for uid, plan in plans.items():
        if sources & plan.sop_to_slice.keys():
            return uid
    return None
