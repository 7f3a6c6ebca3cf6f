"""The synthetic sites as NIfTI datasets: a plain folder, an MSD task, a BIDS dataset.

Each layout holds the same subjects as the site's DICOM folder, so every data
source is tested on the same voxels: the image is what a DICOM reader decodes
(``stored * RescaleSlope + RescaleIntercept``, float32, axes (i, j, k) = DICOM
(column, row, slice)), the label the site's label volume, both with the series'
RAS affine. Written beside ``dicom/`` in the site folder: ``nifti/``, ``msd/``,
``bids/`` (see :mod:`medfed.data.nifti_layouts` for how each is read).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medfed.synth.profiles import LABEL_NAMES

FORMATS = ("dicom", "nifti", "msd", "bids")
NIFTI_FORMATS = FORMATS[1:]
BIDS_PIPELINE = "medfed-synth"
BIDS_VERSION = "1.9.0"


@dataclass(frozen=True)
class LayoutSubject:
    """One subject to write: its name, decoded image, label, RAS affine, lesion flag."""

    name: str
    image: np.ndarray
    label: np.ndarray
    affine_ras: np.ndarray
    lesion: bool


def nifti_image(array: np.ndarray, affine_ras: np.ndarray) -> nib.Nifti1Image:
    """A NIfTI-1 image with both qform and sform set to the scanner (RAS mm) affine."""
    image = nib.Nifti1Image(array, affine_ras)
    image.set_qform(affine_ras, code=1)
    image.set_sform(affine_ras, code=1)
    image.header.set_xyzt_units("mm")
    return image


def decoded_image(stored: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """The float32 volume a DICOM reader gets from these stored values (as medfed.data does)."""
    return (stored.astype(np.float64) * slope + intercept).astype(np.float32)


def bids_label(subject: str) -> str:
    """A BIDS subject label (letters and digits only) for ``SYN-site1-001``: ``SYNsite1001``."""
    return "".join(ch for ch in subject if ch.isalnum())


def write_subject(
    site_dir: Path, formats: Sequence[str], s: LayoutSubject, *, contrast: str
) -> int:
    """Write one subject's image and label in each NIfTI layout of ``formats``; bytes written."""
    image, label = nifti_image(s.image, s.affine_ras), nifti_image(s.label, s.affine_ras)
    paths = []
    if "nifti" in formats:
        paths += [
            (image, site_dir / "nifti" / "images" / f"{s.name}.nii.gz"),
            (label, site_dir / "nifti" / "labels" / f"{s.name}.nii.gz"),
        ]
    if "msd" in formats:
        paths += [
            (image, site_dir / "msd" / "imagesTr" / f"{s.name}.nii.gz"),
            (label, site_dir / "msd" / "labelsTr" / f"{s.name}.nii.gz"),
        ]
    if "bids" in formats:
        sub = f"sub-{bids_label(s.name)}"
        paths += [
            (image, site_dir / "bids" / sub / "anat" / f"{sub}_{contrast}.nii.gz"),
            (
                label,
                site_dir
                / "bids"
                / "derivatives"
                / BIDS_PIPELINE
                / sub
                / "anat"
                / f"{sub}_dseg.nii.gz",
            ),
        ]
    written = 0
    for img, path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        nib.save(img, path)
        written += path.stat().st_size
    return written


def write_indexes(
    site_dir: Path, formats: Sequence[str], lesions: dict[str, bool], *, site: str, contrast: str
) -> int:
    """Write each layout's index files (targets, dataset.json, participants.tsv); bytes written.

    ``lesions`` maps each subject's name to its lesion flag, in subject order.
    """
    written = 0
    targets = (
        json.dumps({name: {"lesion": int(flag)} for name, flag in lesions.items()}, indent=2) + "\n"
    )
    if "nifti" in formats:
        written += _write_text(site_dir / "nifti" / "targets.json", targets)
    if "msd" in formats:
        dataset = {
            "name": f"medfed-synth {site}",
            "description": "synthetic brain MRI on the MNI152 template (medfed data synth)",
            "reference": "medfed.synth",
            "licence": "CC0 (synthetic)",
            "release": "1.0",
            "tensorImageSize": "3D",
            "modality": {"0": contrast},
            "labels": {str(i): name for i, name in enumerate(LABEL_NAMES)},
            "numTraining": len(lesions),
            "numTest": 0,
            "training": [
                {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
                for name in lesions
            ],
            "test": [],
        }
        written += _write_text(
            site_dir / "msd" / "dataset.json", json.dumps(dataset, indent=2) + "\n"
        )
        written += _write_text(site_dir / "msd" / "targets.json", targets)
    if "bids" in formats:
        written += _write_bids_indexes(site_dir / "bids", lesions, site=site)
    return written


def _write_text(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return len(text.encode())


def _write_bids_indexes(root: Path, lesions: dict[str, bool], *, site: str) -> int:
    n = _write_text(
        root / "dataset_description.json",
        json.dumps(
            {
                "Name": f"medfed-synth {site}",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "raw",
                "GeneratedBy": [{"Name": "medfed data synth"}],
            },
            indent=2,
        )
        + "\n",
    )
    n += _write_text(
        root / "derivatives" / BIDS_PIPELINE / "dataset_description.json",
        json.dumps(
            {
                "Name": "tissue labels",
                "BIDSVersion": BIDS_VERSION,
                "DatasetType": "derivative",
                "GeneratedBy": [{"Name": BIDS_PIPELINE}],
            },
            indent=2,
        )
        + "\n",
    )
    table = io.StringIO()
    writer = csv.writer(table, delimiter="\t", lineterminator="\n")
    writer.writerow(["participant_id", "lesion"])
    for name, flag in lesions.items():
        writer.writerow([f"sub-{bids_label(name)}", int(flag)])
    return n + _write_text(root / "participants.tsv", table.getvalue())
