"""Synthetic multi-site brain MRI benchmark that works offline (``medfed data synth``).

What is real: the anatomy, the MNI ICBM152 2009 nonlinear symmetric T1 template with its
grey-matter and white-matter probability maps and brain mask, bundled inside nilearn
(no download). What is synthetic: everything else. Each subject is a random smooth
deformation of the template (small affine plus a smooth displacement field); half the
subjects (per site, by default) carry a Gaussian white-matter lesion, hypo-intense on
T1w and hyper-intense on T2w. Each site has its own scanner profile (tissue contrast,
gamma curve, smooth multiplicative bias field, Rician noise, in-plane resolution,
slice spacing and thickness, raw scale); one site is T2-like (CSF bright, WM dark).

Labels: 0 background, 1 CSF, 2 GM, 3 WM. CSF is the brain mask minus GM minus WM
(nilearn ships no CSF map); the label is the argmax of (CSF, GM, WM) inside the mask,
resampled nearest-neighbour onto each site's grid with the same warp as the image.

Public pretraining data (:mod:`medfed.synth.public`) is built the same way from another
brain: Colin27 (Debian's mricron-data, :mod:`medfed.synth.colin27`), its labels from a
Gaussian mixture on its own T1, never from MNI152's maps.

On-disk layout (``synthesize_sites(out, ...)``)::

    out/synth.json                               what is real / synthetic, sites, seed
    out/site-N/manifest.json                     SeriesInstanceUID -> subject entry
    out/site-N/dicom/SYN-siteN-MMM/IM-KKKK.dcm   one MR file per slice, KKKK = k + 1
    out/site-N/labels/SYN-siteN-MMM.nii.gz       uint8 label volume

``manifest.json`` holds ``{"format", "version", "labels", "targets", "site", "profile",
"label_names", "axes", "series": {<SeriesInstanceUID>: {"subject", "dicom", "label",
"lesion", "profile", "lesion_centre_mni_mm", "lesion_sigma_mm"}}}``; paths are relative
to the site folder. ``version``, ``labels`` (SeriesInstanceUID -> label path) and
``targets`` (SeriesInstanceUID -> ``{"lesion": 0 | 1}``) are the keys of
:mod:`medfed.data.labels` and :mod:`medfed.data.targets`, so ``DicomFolderSource(site_dir,
manifest=site_dir / "manifest.json")`` reads a site as written; ``label_names`` maps
label values to tissue names.

Axis convention (the DICOM reader must agree with this)
-------------------------------------------------------
Arrays have axes ``(i, j, k)`` = DICOM (column, row, slice):
``volume[i, j, k] == pixel_array[j, i] * RescaleSlope + RescaleIntercept`` of the file
with InstanceNumber ``k + 1`` (``pixel_array`` is (Rows, Columns); Rows != Columns here,
so a transposition shows). This is MONAI ``PydicomReader(swap_ij=True)``'s order.

With ``r`` = ImageOrientationPatient[0:3] (direction of increasing i),
``c`` = ImageOrientationPatient[3:6] (increasing j), ``n = r x c``,
``PixelSpacing = (dj, di)`` (row spacing first), ``dk`` = SpacingBetweenSlices =
distance between consecutive ImagePositionPatient along ``n``, and ``IPP_0`` the
position of slice k = 0 (slices ascend along ``n``; InstanceNumber ascends with k)::

    affine_lps = [[di*r, dj*c, dk*n, IPP_0], [0, 0, 0, 1]]   (as columns)
    affine_ras = diag(-1, -1, 1, 1) @ affine_lps

The label NIfTI stores the same (i, j, k) array with ``affine_ras`` as qform and sform
(code 1), so ``nibabel.load(label).affine`` equals the DICOM-derived RAS affine.
All series are axial: r = +x LPS (toward patient left), c = +y LPS (posterior),
n = +z (superior). SliceThickness may differ from SpacingBetweenSlices (gap).

Determinism: the same seed gives byte-identical files; every random stream is a
``numpy.random.Generator`` seeded from (seed, site, subject, purpose). UIDs come
from ``pydicom.uid.generate_uid`` with entropy from (seed, site, subject, role).
"""

from medfed.synth.generate import SubjectVolume, quantise, synthesize_subject
from medfed.synth.geometry import SeriesGeometry
from medfed.synth.profiles import DEFAULT_PROFILES, LABEL_NAMES, ScannerProfile, profile_for_site
from medfed.synth.sites import (
    SUMMARY_HEADER,
    SiteManifest,
    SiteSummary,
    SubjectArrays,
    SubjectEntry,
    SynthManifest,
    load_subject_arrays,
    read_site_manifest,
    synthesize_sites,
)

__all__ = [
    "DEFAULT_PROFILES",
    "LABEL_NAMES",
    "SUMMARY_HEADER",
    "ScannerProfile",
    "SeriesGeometry",
    "SiteManifest",
    "SiteSummary",
    "SubjectArrays",
    "SubjectEntry",
    "SubjectVolume",
    "SynthManifest",
    "load_subject_arrays",
    "profile_for_site",
    "quantise",
    "read_site_manifest",
    "synthesize_sites",
    "synthesize_subject",
]
