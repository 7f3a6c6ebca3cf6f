"""Series geometry: array axes, DICOM position/orientation tags and the RAS affine, in one place.

Array axes ``(i, j, k)`` are DICOM (column, row, slice): ``volume[i, j, k]`` is
``pixel_array[j, i]`` of the slice with InstanceNumber ``k + 1``. With ``r`` the
row direction cosine (ImageOrientationPatient[0:3], the direction of increasing
column index i), ``c`` the column direction cosine (ImageOrientationPatient[3:6],
increasing row index j), ``n = r x c``, PixelSpacing ``= (dj, di)`` and ``dk`` the
SpacingBetweenSlices, the LPS position of voxel (i, j, k) is::

    IPP_0 + i * di * r + j * dj * c + k * dk * n      (IPP_k = IPP_0 + k * dk * n)

so the LPS affine has columns ``(di*r, dj*c, dk*n, IPP_0)`` and the RAS affine
(written to the NIfTI labels, as MONAI's PydicomReader returns it) is
``diag(-1, -1, 1, 1) @ affine_lps``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class SeriesGeometry:
    """The voxel grid of one DICOM series.

    Parameters
    ----------
    shape : tuple of int
        ``(columns, rows, slices)``: array shape in (i, j, k) order.
    spacing : tuple of float
        ``(di, dj, dk)`` in mm: column spacing, row spacing, slice spacing.
    origin_lps : tuple of float
        ImagePositionPatient of slice k = 0 (centre of voxel (0, 0, 0)), LPS mm.
    row_cosine, col_cosine : tuple of float
        The two halves of ImageOrientationPatient (LPS).
    slice_thickness : float
        SliceThickness (mm), may differ from ``dk``.
    """

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin_lps: tuple[float, float, float]
    row_cosine: tuple[float, float, float] = (1.0, 0.0, 0.0)
    col_cosine: tuple[float, float, float] = (0.0, 1.0, 0.0)
    slice_thickness: float = 0.0

    @property
    def normal(self) -> np.ndarray:
        """Slice normal ``r x c`` (LPS); slices are stacked along it."""
        return np.cross(np.asarray(self.row_cosine), np.asarray(self.col_cosine))

    def affine_lps(self) -> np.ndarray:
        """Voxel (i, j, k) to LPS mm."""
        di, dj, dk = self.spacing
        aff = np.eye(4)
        aff[:3, 0] = np.asarray(self.row_cosine) * di
        aff[:3, 1] = np.asarray(self.col_cosine) * dj
        aff[:3, 2] = self.normal * dk
        aff[:3, 3] = self.origin_lps
        return aff

    def affine_ras(self) -> np.ndarray:
        """Voxel (i, j, k) to RAS mm (the NIfTI / MONAI convention)."""
        return LPS_TO_RAS @ self.affine_lps()

    def slice_position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (LPS mm)."""
        return np.asarray(self.origin_lps) + k * self.spacing[2] * self.normal

    def ras_points(self) -> np.ndarray:
        """RAS mm coordinates of every voxel centre, shape ``(3, *shape)``."""
        idx = np.indices(self.shape, dtype=np.float64).reshape(3, -1)
        pts = self.affine_ras()[:3, :3] @ idx + self.affine_ras()[:3, 3:4]
        return pts.reshape((3, *self.shape))


def axial_geometry(
    *,
    fov_mm: Sequence[float],
    centre_ras: Sequence[float],
    in_plane_mm: float,
    slice_spacing_mm: float,
    slice_thickness_mm: float,
) -> SeriesGeometry:
    """Return an axial grid (rows anterior to posterior, columns right to left, slices upward).

    The matrix size is ``round(fov / spacing)`` per axis; the grid is centred on
    ``centre_ras``. Positions are rounded to 1e-4 mm so that they survive the
    decimal-string (DS) encoding of DICOM exactly.
    """
    shape = (
        max(1, round(fov_mm[0] / in_plane_mm)),
        max(1, round(fov_mm[1] / in_plane_mm)),
        max(1, round(fov_mm[2] / slice_spacing_mm)),
    )
    spacing = (float(in_plane_mm), float(in_plane_mm), float(slice_spacing_mm))
    centre_lps = np.asarray(centre_ras, dtype=float) * np.array([-1.0, -1.0, 1.0])
    # row cosine +x LPS (toward Left), column cosine +y LPS (toward Posterior), normal +z.
    half = (np.asarray(shape) - 1) / 2.0 * np.asarray(spacing)
    origin = np.round(centre_lps - half, 4)
    return SeriesGeometry(
        shape=shape,
        spacing=spacing,
        origin_lps=(float(origin[0]), float(origin[1]), float(origin[2])),
        slice_thickness=float(slice_thickness_mm),
    )
