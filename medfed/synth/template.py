"""The real anatomy every synthetic subject starts from: MNI ICBM152 2009 as shipped in nilearn."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from medfed.core.errors import MedfedError

#: Resolution (mm) at which the template is read from nilearn.
TEMPLATE_RESOLUTION_MM = 2

TEMPLATE_CITATION = (
    "Fonov VS, Evans AC, McKinstry RC, Almli CR, Collins DL. Unbiased nonlinear average "
    "age-appropriate brain templates from birth to adulthood. NeuroImage 47:S102 (2009); "
    "Fonov et al., NeuroImage 54(1):313-327 (2011)."
)
TEMPLATE_NOTICE = (
    "MNI ICBM152 2009 nonlinear symmetric template: Copyright (C) 1993-2009 Louis Collins, "
    "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University. "
    "Permission to use, copy, modify, and distribute is granted provided the copyright "
    "notice appears in all copies. Files as bundled with nilearn (no download)."
)


@dataclass(frozen=True)
class TemplateVolumes:
    """Template arrays on one RAS grid (nilearn's 2 mm MNI grid).

    ``t1`` is the real T1 template (0-1), ``tissue`` the (CSF, GM, WM) probability maps
    stacked on axis 0 (CSF = brain mask minus GM minus WM, clipped to [0, 1], since
    nilearn ships no CSF map), ``labels`` the argmax label map (0 background, 1 CSF,
    2 GM, 3 WM) inside the brain mask, ``texture`` the part of the T1 template that
    the tissue means do not explain, and ``affine`` the voxel-to-RAS-mm matrix.
    """

    t1: np.ndarray
    tissue: np.ndarray
    labels: np.ndarray
    mask: np.ndarray
    texture: np.ndarray
    affine: np.ndarray


@functools.lru_cache(maxsize=1)
def load_template() -> TemplateVolumes:
    """Load the MNI152 T1, GM, WM and brain mask bundled with nilearn (cached, offline)."""
    try:
        from nilearn import datasets
    except ImportError as err:  # pragma: no cover - nilearn is a declared dependency here
        raise MedfedError(
            "nilearn is not installed; the synthetic benchmark uses its bundled MNI template",
            where="medfed.synth",
            expected="nilearn >= 0.10",
            fix="pip install nilearn",
        ) from err
    res = TEMPLATE_RESOLUTION_MM
    t1_img = datasets.load_mni152_template(resolution=res)
    t1 = np.asarray(t1_img.dataobj, dtype=np.float32)
    gm = np.asarray(datasets.load_mni152_gm_template(resolution=res).dataobj, dtype=np.float32)
    wm = np.asarray(datasets.load_mni152_wm_template(resolution=res).dataobj, dtype=np.float32)
    mask = np.asarray(datasets.load_mni152_brain_mask(resolution=res).dataobj) > 0
    gm = np.clip(gm, 0, 1) * mask
    wm = np.clip(wm, 0, 1) * mask
    csf = np.clip(1.0 - gm - wm, 0, 1) * mask
    tissue = np.stack([csf, gm, wm]).astype(np.float32)
    return template_volumes(t1, tissue, mask, np.asarray(t1_img.affine, dtype=np.float64))


def template_volumes(
    t1: np.ndarray, tissue: np.ndarray, mask: np.ndarray, affine: np.ndarray
) -> TemplateVolumes:
    """Label map, texture and read-only arrays from a T1, its (CSF, GM, WM) maps and mask.

    Shared by every template (MNI152 here, Colin27 in :mod:`medfed.synth.colin27`), so
    their labels and texture are made the same way.
    """
    mask = np.asarray(mask, dtype=bool)
    tissue = np.asarray(tissue, dtype=np.float32)
    labels = np.where(mask, np.argmax(tissue, axis=0) + 1, 0).astype(np.uint8)
    t1 = (np.clip(t1, 0, None) * mask).astype(np.float32)
    # Texture: the T1 template minus its best fit by tissue means (least squares in the mask).
    design = tissue[:, mask].T
    coef, *_ = np.linalg.lstsq(design, t1[mask], rcond=None)
    fit = np.tensordot(coef, tissue, axes=1)
    texture = ((t1 - fit) * mask).astype(np.float32)
    affine = np.array(affine, dtype=np.float64)
    for arr in (t1, tissue, labels, mask, texture, affine):
        arr.setflags(write=False)
    return TemplateVolumes(
        t1=t1, tissue=tissue, labels=labels, mask=mask, texture=texture, affine=affine
    )
