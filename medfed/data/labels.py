"""Label volumes from NIfTI files, matched to series through a small manifest.

Manifest format
---------------
JSON (``*.json``)::

    {"version": 1,
     "labels": {"1.2.840.113619.2.55.3.1234": "labels/liver_ct1.nii.gz"}}

or CSV (``*.csv``) with a header row::

    series_uid,label
    1.2.840.113619.2.55.3.1234,labels/liver_ct1.nii.gz

Label paths are relative to the manifest's folder. A NIfTI label must lie on
the series' voxel grid, possibly with its axes permuted or flipped (as written
by tools that save in RAS); it is reoriented to the series' ``(x, y, z)``
order, otherwise it is rejected with the fix (resample it onto the series).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from medfed.core.errors import MedfedError

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_TOL_VOXEL = 0.1


def read_manifest_text(path: Path) -> str:
    """The manifest's text, or a MedfedError naming the file."""
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MedfedError(
            "cannot read the label manifest", where=str(path), fix="check the path in site.toml"
        ) from exc


def load_manifest(path: Path) -> dict[str, Path]:
    """Read a label manifest: SeriesInstanceUID -> absolute label path.

    Raises
    ------
    MedfedError
        The manifest is unreadable or malformed, or names a missing file.
    """
    text = read_manifest_text(path)
    if path.suffix.lower() == ".csv":
        entries = _parse_csv(text, path)
    else:
        entries = _parse_json(text, path)
    labels = {uid: (path.parent / rel).resolve() for uid, rel in entries.items()}
    missing = [str(p) for p in labels.values() if not p.is_file()]
    if missing:
        raise MedfedError(
            f"{len(missing)} label file(s) named in the manifest do not exist",
            where=f"{path}: {missing[0]}",
            expected="label paths relative to the manifest's folder",
            fix="correct the paths or remove those entries",
        )
    return labels


def nifti_label_volume(
    path: Path, image_affine: np.ndarray, image_shape: tuple[int, int, int]
) -> np.ndarray:
    """Load a NIfTI label onto an image grid.

    Parameters
    ----------
    path : Path
        ``.nii`` or ``.nii.gz`` label file.
    image_affine : numpy.ndarray
        The series' 4x4 voxel-to-LPS affine.
    image_shape : tuple of int
        The series' ``(x, y, z)`` shape.

    Returns
    -------
    numpy.ndarray
        int16 ``(x, y, z)``.

    Raises
    ------
    MedfedError
        nibabel missing, unreadable file, or a label grid that differs from the
        image's beyond a permutation/flip of axes.
    """
    try:
        import nibabel as nib
    except ImportError as exc:
        raise MedfedError(
            "reading NIfTI labels needs nibabel", where=str(path), fix="pip install nibabel"
        ) from exc
    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj)
        label_affine = _LPS_FROM_RAS @ np.asarray(image.affine, dtype=float)
    except Exception as exc:  # nibabel raises several types on corrupt files
        raise MedfedError(
            "cannot read the NIfTI label", where=str(path), expected="a .nii or .nii.gz file"
        ) from exc
    if data.ndim > 3 and all(n == 1 for n in data.shape[3:]):
        data = data.reshape(data.shape[:3])  # trailing singleton dimensions (e.g. time)
    aligned = align_to_grid(data, label_affine, image_affine, image_shape)
    if aligned is None:
        raise MedfedError(
            "the NIfTI label is not on its series' voxel grid",
            where=str(path),
            expected=f"shape {image_shape} covering the same voxels as the DICOM series",
            fix="resample the label onto the series (nearest neighbour) and save it again",
        )
    return np.ascontiguousarray(aligned.astype(np.int16))


def align_to_grid(
    data: np.ndarray,
    data_affine: np.ndarray,
    target_affine: np.ndarray,
    target_shape: tuple[int, int, int],
) -> np.ndarray | None:
    """Reorder/flip ``data``'s axes onto the target grid, or ``None`` if it is not the same grid.

    Both affines map voxel indices to the same world frame.
    """
    if data.ndim != 3:
        return None
    # Maps a target voxel index to a data voxel index.
    t = np.linalg.inv(data_affine) @ target_affine
    rot = t[:3, :3]
    perm = np.argmax(np.abs(rot), axis=0)  # data axis for each target axis
    if sorted(perm.tolist()) != [0, 1, 2]:
        return None
    signs = np.sign(rot[perm, [0, 1, 2]])
    expected = np.zeros((3, 3))
    expected[perm, [0, 1, 2]] = signs
    if not np.allclose(rot, expected, atol=1e-3):
        return None
    out = np.transpose(data, perm)
    for axis in range(3):
        n = target_shape[axis]
        if out.shape[axis] != n:
            return None
        start = t[perm[axis], 3]
        want = 0.0 if signs[axis] > 0 else n - 1.0
        if abs(start - want) > _TOL_VOXEL:
            return None
        if signs[axis] < 0:
            out = np.flip(out, axis=axis)
    return out


def _parse_json(text: str, path: Path) -> dict[str, str]:
    try:
        data = json.loads(text)
        labels = data["labels"]
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise TypeError("labels must map strings to strings")
    except (ValueError, KeyError, TypeError) as exc:
        raise MedfedError(
            "the label manifest is malformed",
            where=str(path),
            expected='{"version": 1, "labels": {"<SeriesInstanceUID>": "<relative/label.nii.gz>"}}',
            fix="rewrite the manifest in that form",
        ) from exc
    return dict(labels)


def _parse_csv(text: str, path: Path) -> dict[str, str]:
    rows = list(csv.DictReader(text.splitlines()))
    if rows and not {"series_uid", "label"} <= set(rows[0]):
        rows = []
    if not rows:
        raise MedfedError(
            "the label manifest is malformed or empty",
            where=str(path),
            expected="a CSV with header 'series_uid,label' and one row per series",
            fix="rewrite the manifest in that form",
        )
    return {row["series_uid"].strip(): row["label"].strip() for row in rows}
