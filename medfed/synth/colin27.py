"""A second, different brain for public pretraining: Colin27 ("ch2") from mricron-data.

The benchmark's sites are warps of the MNI152 2009 template (the average of 152
brains, :mod:`medfed.synth.template`); pretraining on that same anatomy would share
the sites' anatomy. Colin27 is one man scanned 27 times and averaged (Holmes et al.
1998), MNI-aligned: another brain. It is read from the Debian package
``mricron-data`` (MRIcron's templates, BSD-3-clause, Chris Rorden): the
brain-extracted 1 mm T1 ``ch2bet.nii.gz``, resampled onto nilearn's 2 mm MNI grid
(the grid of :func:`~medfed.synth.template.load_template`).

Its tissue maps come from its own intensities, not from MNI152's maps: a seeded
three-class Gaussian mixture on the T1 of its brain voxels (brain = ``ch2bet > 0``)
at 1 mm, the posteriors (classes ordered CSF < GM < WM by mean T1) resampled to the
2 mm grid as the (CSF, GM, WM) maps. Labels (argmax) and texture are made as for
MNI152 (:func:`~medfed.synth.template.template_volumes`).
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np

from medfed.core.errors import MedfedError
from medfed.synth.template import TEMPLATE_RESOLUTION_MM, TemplateVolumes, template_volumes

#: The brain-extracted Colin27 T1 (1 mm, MNI-aligned) as Debian's mricron-data installs it.
COLIN27_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")
#: Seed of the Gaussian mixture that makes the tissue maps.
GMM_SEED = 27

COLIN27_CITATION = (
    "Holmes CJ, Hoge R, Collins L, Woods R, Toga AW, Evans AC. Enhancement of MR images "
    "using registration for signal averaging. J Comput Assist Tomogr 22(2):324-333 (1998)."
)
COLIN27_NOTICE = (
    "Colin27 single-subject T1 ('ch2bet', brain-extracted), MNI-aligned, as shipped in "
    "MRIcron's templates by the Debian package mricron-data: Copyright 2006-2010 Chris "
    "Rorden, BSD-3-clause. Read from /usr/share/mricron/templates (no download); tissue "
    "maps made by medfed (Gaussian mixture on its T1)."
)


def _missing(path: Path, what: str) -> MedfedError:
    return MedfedError(
        f"The Colin27 brain that public pretraining uses {what}.",
        where=str(path),
        expected="MRIcron's Colin27 template ch2bet.nii.gz (Debian package mricron-data)",
        fix="apt install mricron-data (as root or with sudo; `make test` installs it)",
    )


def colin27_missing() -> str:
    """Why Colin27 cannot be read here ("" when it can): for a test's skip reason."""
    if COLIN27_PATH.is_file():
        return ""
    return f"{COLIN27_PATH} is missing: apt install mricron-data (`make test` installs it)"


@functools.lru_cache(maxsize=1)
def load_colin27() -> TemplateVolumes:
    """Colin27 on the 2 mm MNI grid, its tissue maps from its own T1 (cached, offline)."""
    path = COLIN27_PATH
    if not path.is_file():
        raise _missing(path, "is not installed")
    import nibabel as nib
    from nilearn import datasets, image
    from sklearn.mixture import GaussianMixture

    try:
        src = nib.load(str(path))
        t1_1mm = np.asarray(src.dataobj, dtype=np.float32)
    except Exception as err:  # a truncated or foreign file: say so, with the fix
        raise _missing(path, f"cannot be read ({type(err).__name__}: {err})") from err
    if t1_1mm.ndim != 3:
        raise _missing(path, f"is not a 3-D volume (shape {t1_1mm.shape})")
    brain = t1_1mm > 0
    values = t1_1mm[brain].reshape(-1, 1).astype(np.float64)
    gmm = GaussianMixture(n_components=3, random_state=GMM_SEED, n_init=1, max_iter=200)
    gmm.fit(values[:: max(1, len(values) // 100_000)])  # every n-th voxel: seconds
    order = np.argsort(gmm.means_.ravel())  # CSF < GM < WM on a T1
    post = gmm.predict_proba(values)[:, order].astype(np.float32)

    target = datasets.load_mni152_template(resolution=TEMPLATE_RESOLUTION_MM)

    def to_grid(vol: np.ndarray) -> np.ndarray:
        img = nib.Nifti1Image(vol.astype(np.float32), src.affine)
        with warnings.catch_warnings():  # the mask is resampled linearly on purpose
            warnings.simplefilter("ignore", UserWarning)
            out = image.resample_to_img(
                img, target, interpolation="continuous", force_resample=True, copy_header=True
            )
        return np.asarray(out.dataobj, dtype=np.float32)

    t1 = to_grid(t1_1mm)
    mask = to_grid(brain.astype(np.float32)) > 0.5
    maps = []
    for c in range(3):
        full = np.zeros(t1_1mm.shape, np.float32)
        full[brain] = post[:, c]
        maps.append(np.clip(to_grid(full), 0, None))
    tissue = np.stack(maps)
    total = tissue.sum(axis=0)
    tissue = np.where(mask & (total > 0), tissue / np.where(total > 0, total, 1), 0)
    # The same 0-1 scale as the MNI152 template: the brain's top intensity at 1.
    top = float(np.percentile(t1[mask], 99.9))
    t1 = np.clip(t1 / top, 0, 1) * mask
    return template_volumes(t1, tissue.astype(np.float32), mask, target.affine)
