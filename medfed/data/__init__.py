"""Site data: DICOM folders decoded into MONAI-ready volumes, labels, cache, scan report.

Axis convention: images are ``(c, x, y, z)`` MetaTensors whose affine maps voxel
indices to patient millimetres in DICOM's LPS frame (see
:mod:`medfed.data.geometry`).
"""

from medfed.data.cache import SeriesCache, fingerprint
from medfed.data.labels import load_manifest
from medfed.data.records import SkipReason
from medfed.data.scan import ScanReport, SeriesSummary, SkippedFile, scan_folder
from medfed.data.series import Series
from medfed.data.source import DicomFolderSource, load_series

__all__ = [
    "DicomFolderSource",
    "ScanReport",
    "Series",
    "SeriesCache",
    "SeriesSummary",
    "SkipReason",
    "SkippedFile",
    "fingerprint",
    "load_manifest",
    "load_series",
    "scan_folder",
]
