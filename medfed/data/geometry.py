"""Slice geometry as pure functions: normals, ordering, spacing checks, affines.

Axis convention used throughout :mod:`medfed.data`: a volume is indexed
``(x, y, z)`` where ``x`` runs along a row of the image (DICOM column index,
direction cosine ``ImageOrientationPatient[0:3]``), ``y`` runs down a column
(DICOM row index, ``ImageOrientationPatient[3:6]``) and ``z`` follows the slice
normal ``row x column``. The affine maps ``(x, y, z, 1)`` to patient
coordinates in millimetres in DICOM's LPS frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfed.data.records import SkipReason

AXIAL: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


class GeometryProblem(Exception):
    """Slices that cannot form a regular volume; carries the :class:`SkipReason`."""

    def __init__(self, reason: SkipReason, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason.value}: {detail}")


@dataclass(frozen=True)
class SliceStack:
    """How sorted slices sit in space: the step between slices and its length."""

    order: np.ndarray
    step: np.ndarray
    spacing: float


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal ``row x column`` of an ``ImageOrientationPatient`` value."""
    row = np.asarray(orientation[:3], dtype=float)
    col = np.asarray(orientation[3:6], dtype=float)
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm < 1e-6:
        raise GeometryProblem(SkipReason.INVALID_ATTRIBUTES, "degenerate ImageOrientationPatient")
    return normal / norm


def stack_slices(
    positions: Sequence[Sequence[float]],
    orientation: Sequence[float],
    *,
    fallback_spacing: float | None,
    rel_tol: float = 0.05,
    abs_tol: float = 1e-3,
) -> SliceStack:
    """Order slice positions along the normal and check they are evenly spaced.

    Parameters
    ----------
    positions : sequence of 3-vectors
        ``ImagePositionPatient`` of each slice, in any order.
    orientation : sequence of 6 floats
        The common ``ImageOrientationPatient``.
    fallback_spacing : float or None
        Slice spacing to use for a single slice (``SpacingBetweenSlices`` or
        ``SliceThickness``); 1.0 if ``None``.
    rel_tol, abs_tol : float
        Allowed deviation of each step from the median step.

    Returns
    -------
    SliceStack
        ``order`` sorts the input along the normal; ``step`` is the mean vector
        between consecutive slices (it may lean off the normal, e.g. gantry
        tilt); ``spacing`` its length along the normal.

    Raises
    ------
    GeometryProblem
        Duplicate positions, missing slices or uneven spacing.
    """
    normal = slice_normal(orientation)
    pos = np.asarray(positions, dtype=float).reshape(-1, 3)
    proj = pos @ normal
    order = np.argsort(proj, kind="stable")
    if len(pos) == 1:
        spacing = fallback_spacing if fallback_spacing and fallback_spacing > 0 else 1.0
        return SliceStack(order=order, step=normal * spacing, spacing=float(spacing))
    pos, proj = pos[order], proj[order]
    gaps = np.diff(proj)
    median = float(np.median(gaps))
    tol = max(abs_tol, rel_tol * median)
    if median <= abs_tol or np.any(gaps <= abs_tol):
        n_dup = int(np.sum(gaps <= abs_tol))
        raise GeometryProblem(SkipReason.DUPLICATE_POSITIONS, f"{n_dup} slice(s) share a position")
    ratio = gaps / median
    if np.any(np.abs(gaps - median) > tol):
        whole = np.abs(ratio - np.round(ratio)) * median <= tol
        if np.all(whole):
            missing = int(np.sum(np.round(ratio) - 1))
            raise GeometryProblem(
                SkipReason.MISSING_SLICES,
                f"{missing} slice(s) missing from a stack of {len(pos) + missing}",
            )
        raise GeometryProblem(
            SkipReason.INCONSISTENT_SPACING,
            f"slice gaps from {gaps.min():.3f} to {gaps.max():.3f} mm",
        )
    steps = np.diff(pos, axis=0)
    step = steps.mean(axis=0)
    if np.any(np.linalg.norm(steps - step, axis=1) > tol):
        raise GeometryProblem(SkipReason.INCONSISTENT_GEOMETRY, "slices do not lie on a line")
    return SliceStack(order=order, step=step, spacing=float(step @ normal))


def build_affine(
    orientation: Sequence[float],
    pixel_spacing: Sequence[float],
    origin: Sequence[float],
    step: Sequence[float],
) -> np.ndarray:
    """Voxel ``(x, y, z)`` to LPS millimetres, as a 4x4 matrix.

    Parameters
    ----------
    orientation : sequence of 6 floats
        ``ImageOrientationPatient`` (row cosine, then column cosine).
    pixel_spacing : sequence of 2 floats
        DICOM ``PixelSpacing``: (between rows, between columns).
    origin : 3-vector
        ``ImagePositionPatient`` of the first slice (centre of its first pixel).
    step : 3-vector
        Vector from one slice to the next.
    """
    affine = np.eye(4)
    affine[:3, 0] = np.asarray(orientation[:3], dtype=float) * float(pixel_spacing[1])
    affine[:3, 1] = np.asarray(orientation[3:6], dtype=float) * float(pixel_spacing[0])
    affine[:3, 2] = np.asarray(step, dtype=float)
    affine[:3, 3] = np.asarray(origin, dtype=float)
    return affine


def same_orientation(a: Sequence[float], b: Sequence[float], tol: float = 1e-4) -> bool:
    """Whether two ``ImageOrientationPatient`` values agree within ``tol``."""
    return bool(np.allclose(np.asarray(a, float), np.asarray(b, float), atol=tol))
