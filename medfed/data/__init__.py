"""Site data: DICOM folders decoded into MONAI-ready volumes, labels, cache, scan report.

Axis convention: images are ``(c, x, y, z)`` MetaTensors whose affine maps voxel
indices to patient millimetres in DICOM's LPS frame (see
:mod:`medfed.data.geometry`).
"""

from medfed.data.available import check_source_available
from medfed.data.cache import CacheStats, SeriesCache, fingerprint
from medfed.data.heal import CacheCheck, HealedFile, take_healed
from medfed.data.labels import load_manifest
from medfed.data.records import SkipReason
from medfed.data.scan import ScanReport, SeriesSummary, SkippedFile, scan_folder
from medfed.data.series import Series
from medfed.data.source import DicomFolderSource, load_series, scan_source

__all__ = [
    "CacheCheck",
    "CacheStats",
    "DicomFolderSource",
    "HealedFile",
    "ScanReport",
    "Series",
    "SeriesCache",
    "SeriesSummary",
    "SkipReason",
    "SkippedFile",
    "check_source_available",
    "fingerprint",
    "load_manifest",
    "load_series",
    "scan_folder",
    "scan_source",
    "take_healed",
]
