"""DICOM SEG (binary or fractional) decoded with pydicom onto its series' grid.

Each SEG frame names its segment (SegmentIdentificationSequence /
ReferencedSegmentNumber) and its slice, by source image SOP instance
(DerivationImageSequence) or by ImagePositionPatient. Frames are written into
an int16 label volume ``(x, y, z)`` holding segment numbers; where segments
overlap the higher segment number wins.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medfed.data.assemble import SeriesPlan
from medfed.data.decode import FileProblem, decode_frames, open_dataset
from medfed.data.records import FileRecord, FrameInfo, SkipReason

_TOL_VOXEL = 0.1


def seg_label_volume(path: Path, record: FileRecord, plan: SeriesPlan) -> np.ndarray:
    """Decode a SEG file into labels on ``plan``'s grid.

    Parameters
    ----------
    path : Path
        The SEG file.
    record : FileRecord
        Its header record (per-frame segment numbers and positions).
    plan : SeriesPlan
        The series it labels.

    Returns
    -------
    numpy.ndarray
        int16 ``(x, y, z)``; 0 is background.

    Raises
    ------
    FileProblem
        ``INVALID_SEG`` when a frame does not fall on a slice of the series.
    """
    if (record.rows, record.columns) != (plan.rows, plan.columns):
        raise FileProblem(SkipReason.INVALID_SEG, "SEG frame size differs from the series")
    ds = open_dataset(path)
    frames = decode_frames(ds)[..., 0]
    if ds.get("SegmentationType") == "FRACTIONAL":
        masks = frames > float(ds.get("MaximumFractionalValue", 255)) / 2
    else:
        masks = frames > 0
    labels = np.zeros(plan.shape[1:], dtype=np.int16)
    inverse = np.linalg.inv(plan.affine)
    for k, info in enumerate(record.frames):
        z = _slice_of(info, plan, inverse)
        segment = info.segment if info.segment is not None else 1
        target = labels[..., z]
        mask = masks[k].T  # (rows, cols) -> (x, y)
        target[mask] = np.maximum(target[mask], segment)
    return labels


def _slice_of(info: FrameInfo, plan: SeriesPlan, inverse: np.ndarray) -> int:
    if info.source_sop and info.source_sop in plan.sop_to_slice:
        return plan.sop_to_slice[info.source_sop]
    if info.position is None:
        raise FileProblem(SkipReason.INVALID_SEG, "SEG frame has neither source image nor position")
    x, y, z, _ = inverse @ np.array([*info.position, 1.0])
    k = int(round(z))
    if abs(x) > _TOL_VOXEL or abs(y) > _TOL_VOXEL or abs(z - k) > _TOL_VOXEL:
        raise FileProblem(SkipReason.INVALID_SEG, "SEG frame is not on a slice of the series")
    if not 0 <= k < len(plan.frames):
        raise FileProblem(SkipReason.INVALID_SEG, "SEG frame lies outside the series")
    return k
