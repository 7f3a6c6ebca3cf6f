"""A NIfTI dataset (plain folder, MSD task, BIDS) as a source of scans, cached like DICOM.

The same contract as :class:`medfed.data.DicomFolderSource`: images come back as
float32 :class:`monai.data.MetaTensor` ``(1, x, y, z)`` in the file's voxel order
with a voxel-to-LPS ``affine`` (``meta["space"] == "LPS"``; NIfTI's RAS affine is
flipped), labels as int16 ``(1, x, y, z)`` on the image's grid (a label stored
with its axes permuted or flipped is reordered; one on another grid is refused).
Decoded scans go to the same kind of cache as DICOM series, keyed by the source
files' sizes and modification times, so a changed file is read again.

A scan that cannot be used (unreadable file, a 4-D image without a chosen volume,
a label on another grid or with non-integer values) is left out with its reason
in the scan report, never a crash of the site.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import SpaceKeys

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.data.cache import CachedSeries, SeriesCache, fingerprint
from medfed.data.labels import align_to_grid
from medfed.data.nifti_layouts import (
    NiftiEntry,
    NiftiLayout,
    read_bids,
    read_msd,
    read_nifti_folder,
)
from medfed.data.scan import ScanReport, SeriesSummary, SkippedFile, short_hash

CACHE_DIRNAME = ".medfed-cache"
_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


class Unusable(Exception):
    """A scan that cannot be used; ``reason`` is the report's category, ``detail`` the why."""

    def __init__(self, path: str, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.path, self.reason, self.detail = path, reason, detail


@dataclass(frozen=True)
class Header:
    """What a scan's headers say: its grid (image shape, LPS affine) and voxel size."""

    shape: tuple[int, int, int]
    affine: np.ndarray
    spacing: tuple[float, float, float]


class NiftiSource:
    """The scans of a ``nifti-folder``, ``msd`` or ``bids`` data source.

    Parameters
    ----------
    source : DataSourceConfig
        With absolute paths (:func:`medfed.core.config.resolve_data_source`).
    """

    def __init__(self, source: DataSourceConfig) -> None:
        self.source = source
        self.root = Path(source.path)
        cache_dir = Path(source.cache_dir) if source.cache_dir else self.root / CACHE_DIRNAME
        self.cache_dir = cache_dir
        self._cache: SeriesCache | None = None
        self._layout: NiftiLayout | None = None

    @property
    def cache(self) -> SeriesCache:
        """The decoded-scan cache (its folder is made on first use, not by a scan)."""
        if self._cache is None:
            self._cache = SeriesCache(self.cache_dir)
        return self._cache

    def layout(self) -> NiftiLayout:
        """The dataset's scans and left-out files, as its layout lists them."""
        if self._layout is None:
            s = self.source
            targets = Path(s.targets) if s.targets else None
            if s.kind == "nifti-folder":
                self._layout = read_nifti_folder(
                    self.root, images=s.images, labels=s.labels, targets=targets
                )
            elif s.kind == "msd":
                self._layout = read_msd(self.root, modality=s.modality, targets=targets)
            elif s.kind == "bids":
                self._layout = read_bids(
                    self.root, modality=s.modality, label_pipeline=s.label_pipeline, targets=targets
                )
            else:
                raise MedfedError(
                    f"{s.kind!r} is not a NIfTI data source",
                    where="[data] kind in site.toml",
                    expected="'nifti-folder', 'msd' or 'bids'",
                )
        return self._layout

    def usable(self) -> tuple[list[NiftiEntry], list[Unusable]]:
        """The scans whose headers check out, and why the others were left out."""
        good, bad = [], []
        for entry in self.layout().entries:
            try:
                self.header(entry)
            except Unusable as problem:
                bad.append(problem)
            else:
                good.append(entry)
        return good, bad

    def header(self, entry: NiftiEntry) -> Header:
        """The image's grid, checked against its label's; raises :class:`Unusable`."""
        image = _open(self.root, entry.image)
        shape = _spatial_shape(image, entry)
        affine = _LPS_FROM_RAS @ np.asarray(image.affine, dtype=np.float64)
        if entry.label is not None:
            label = _open(self.root, entry.label)
            label_shape = tuple(int(n) for n in label.shape)
            while len(label_shape) > 3 and label_shape[-1] == 1:
                label_shape = label_shape[:-1]
            grid = np.broadcast_to(np.zeros((), bool), label_shape)  # no data read
            label_affine = _LPS_FROM_RAS @ np.asarray(label.affine, dtype=np.float64)
            if align_to_grid(grid, label_affine, affine, shape) is None:
                raise Unusable(
                    entry.label,
                    "label does not fit its image",
                    f"label {label_shape} vs image {shape}, or another orientation or origin; "
                    "resample the label onto the image (nearest neighbour)",
                )
        zooms = image.header.get_zooms()[:3]
        return Header(
            shape=shape, affine=affine, spacing=(float(zooms[0]), float(zooms[1]), float(zooms[2]))
        )

    def load(self, entry: NiftiEntry) -> tuple[MetaTensor, MetaTensor | None]:
        """One scan's image and label (or ``None``), from the cache when it is current.

        Raises
        ------
        MedfedError
            The scan cannot be used (see :meth:`header`) or its data do not decode.
        """
        try:
            header = self.header(entry)
            key = f"{self.source.kind}:{entry.key}:{entry.channel}"
            sources = [entry.image, *([entry.label] if entry.label else [])]
            stamp = fingerprint(self.root, sources)
            cached = self.cache.get(key, stamp, shape=(1, *header.shape))
            if cached is None:
                cached = self._decode(entry, header)
                self.cache.put(key, stamp, cached)
        except Unusable as problem:
            raise MedfedError(
                f"scan {short_hash(entry.key)} cannot be used: {problem}",
                where=str(self.root / problem.path),
                fix="run `medfed site scan` to see every scan left out and why",
            ) from None
        return _to_metatensors(cached, entry, self.layout().modality)

    def scan(self, *, decode: bool = True) -> ScanReport:
        """What `medfed site scan` reports: usable scans, files left out, the cache."""
        layout = self.layout()
        skipped = [
            SkippedFile(short_hash(x.path), x.path, x.reason, x.detail) for x in layout.left_out
        ]
        summaries = []
        files = len(layout.left_out)
        for entry in layout.entries:
            own = [entry.image, *([entry.label] if entry.label else [])]
            files += len(own)
            try:
                header = self.header(entry)
                if decode:
                    self._decode(entry, header)
            except Unusable as problem:
                skipped += [
                    SkippedFile(short_hash(p), p, problem.reason, problem.detail) for p in own
                ]
                continue
            summaries.append(
                SeriesSummary(
                    series_id=short_hash(entry.key),
                    modality=layout.modality or "-",
                    shape=(1, *header.shape),
                    spacing=header.spacing,
                    slices=header.shape[2],
                    files=len(own),
                    geometry="nifti",
                    label="nifti" if entry.label else "none",
                    transfer_syntaxes=(),
                )
            )
        check = SeriesCache(self.cache_dir).check() if self.cache_dir.is_dir() else None
        return ScanReport(
            files_total=files, series=tuple(summaries), skipped=tuple(skipped), cache=check
        )

    def _decode(self, entry: NiftiEntry, header: Header) -> CachedSeries:
        image = _read_array(self.root, entry.image, entry.channel)
        label = None
        if entry.label is not None:
            raw = _read_array(self.root, entry.label, None)
            if not np.array_equal(raw, np.round(raw)):
                raise Unusable(
                    entry.label,
                    "label is not integer",
                    "a segmentation holds class numbers 0, 1, 2, ...",
                )
            labelled = _open(self.root, entry.label)
            aligned = align_to_grid(
                raw, _LPS_FROM_RAS @ np.asarray(labelled.affine, float), header.affine, header.shape
            )
            if aligned is None:  # the header check passed: only a changed file gets here
                raise Unusable(entry.label, "label does not fit its image", "changed on disk")
            label = np.ascontiguousarray(aligned.astype(np.int16))
        if image.shape != header.shape:
            raise Unusable(entry.image, "image does not match its header", str(image.shape))
        return CachedSeries(
            image=np.ascontiguousarray(image[None], dtype=np.float32),
            affine=header.affine,
            label=label,
        )


def _open(root: Path, rel: str) -> Any:
    import nibabel as nib

    path = root / rel
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise Unusable(rel, "file missing", "the layout names it but it is not there") from None
    except Exception as exc:  # nibabel raises several types for a damaged header
        raise Unusable(rel, "not a readable NIfTI file", type(exc).__name__) from None


def _spatial_shape(image: Any, entry: NiftiEntry) -> tuple[int, int, int]:
    shape = tuple(int(n) for n in image.shape)
    if entry.channel is not None:
        if len(shape) != 4 or entry.channel >= shape[3]:
            raise Unusable(
                entry.image,
                "modality volume missing",
                f"image {shape}, volume {entry.channel} of a 4-D image asked for",
            )
        return shape[0], shape[1], shape[2]
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) != 3:
        raise Unusable(
            entry.image,
            "not a 3-D image",
            f"shape {shape}; a 4-D image needs data.modality (MSD) to pick a volume",
        )
    return shape[0], shape[1], shape[2]


def _read_array(root: Path, rel: str, channel: int | None) -> np.ndarray:
    image = _open(root, rel)
    try:
        data = image.dataobj[..., channel] if channel is not None else image.dataobj[...]
        data = np.asarray(data)
    except Exception as exc:  # a truncated or corrupt gzip stream, mostly
        raise Unusable(rel, "image data do not decode", type(exc).__name__) from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if not np.isfinite(data).all():
        raise Unusable(rel, "image holds NaN or infinite values", "")
    return data.astype(np.float32, copy=False) if data.dtype != np.float32 else data


def _to_metatensors(
    cached: CachedSeries, entry: NiftiEntry, modality: str
) -> tuple[MetaTensor, MetaTensor | None]:
    affine = torch.as_tensor(np.asarray(cached.affine, dtype=np.float64))
    meta: dict[str, Any] = {
        "space": SpaceKeys.LPS,
        "original_channel_dim": 0,
        "spatial_shape": np.asarray(cached.image.shape[1:]),
        "modality": modality,
    }
    image = MetaTensor(torch.from_numpy(cached.image), affine=affine, meta=dict(meta))
    if cached.label is None:
        return image, None
    return image, MetaTensor(
        torch.from_numpy(cached.label[None]), affine=affine.clone(), meta=dict(meta)
    )
