"""N4 bias-field correction of an MRI volume (SimpleITK), before a brain task's preprocessing.

An MRI scanner's receive coils leave a smooth multiplicative field over the image:
the same tissue is brighter on one side of the head than the other. Brain tissue
pipelines (FSL FAST, SPM, FreeSurfer) remove it before they classify tissue; a
network can learn to ignore it, but under DP-SGD's noise it learns less of
everything, so a site with a strong field loses more (``benchmarks/privacy_utility.py``).
N4 (Tustison et al. 2010, ITK's ``N4BiasFieldCorrectionImageFilter``) fits the field
as a B-spline on a downsampled copy of the head (Otsu mask) and divides it out.

A site turns it on for its data with ``bias_correction = "n4"`` in ``[data]``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.data import MetaTensor

from medfed.core.errors import MedfedError

#: B-spline fitting levels and the iterations at each (ITK's default is 4 x 50).
ITERATIONS = (50, 50, 30)
#: The field is fitted on a copy shrunk to at most about this many voxels per axis.
FIT_GRID = 48


def n4_correct(image: MetaTensor) -> MetaTensor:
    """``image`` (``(1, x, y, z)``, float) divided by its N4-estimated bias field.

    The voxel spacing comes from the image's affine, so the field's smoothness is in
    millimetres whatever the grid. Meta data (affine) are kept.
    """
    try:
        import SimpleITK as sitk
    except ImportError:  # a site that asks for N4 without the package
        raise MedfedError(
            "bias_correction = 'n4' needs SimpleITK, which is not installed.",
            where="[data] bias_correction in site.toml",
            fix="pip install SimpleITK (see constraints.txt), or set bias_correction = 'off'",
        ) from None
    volume = image[0].detach().cpu().numpy().astype(np.float32)
    spacing = np.sqrt((np.asarray(image.affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    # SimpleITK indexes arrays (z, y, x): transpose so its axes are ours
    itk_image = sitk.GetImageFromArray(np.ascontiguousarray(volume.transpose(2, 1, 0)))
    itk_image.SetSpacing([float(s) for s in spacing])
    mask = sitk.OtsuThreshold(itk_image, 0, 1, 200)
    shrink = [max(1, math.ceil(n / FIT_GRID)) for n in volume.shape]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(ITERATIONS))
    try:
        n4.Execute(sitk.Shrink(itk_image, shrink), sitk.Shrink(mask, shrink))
        log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(itk_image))
    except RuntimeError as exc:  # e.g. a single-slice series
        reason = str(exc).strip().splitlines()[-1][:200]
        raise MedfedError(
            f"N4 bias-field correction failed on a scan of {volume.shape} voxels: {reason}",
            where="[data] bias_correction in site.toml",
            expected="3D scans of several slices",
            fix="set bias_correction = 'off' for this data",
        ) from None
    log_field = log_field.transpose(2, 1, 0)
    corrected = image.clone()
    corrected[0] = torch.as_tensor(volume / np.exp(log_field), dtype=corrected.dtype)
    return corrected
