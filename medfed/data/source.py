"""A site's DICOM folder as a source of MONAI-ready image/label pairs, cached on disk."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.utils import SpaceKeys

from medfed.core.config import DataSourceConfig
from medfed.core.errors import MedfedError
from medfed.data.assemble import SeriesPlan, assemble
from medfed.data.available import require_folder
from medfed.data.cache import CachedSeries, SeriesCache, fingerprint
from medfed.data.decode import FileProblem, describe_error
from medfed.data.heal import CacheCheck
from medfed.data.index import FolderIndex, Progress, index_folder
from medfed.data.labels import load_manifest, nifti_label_volume
from medfed.data.nifti_layouts import NIFTI_KINDS
from medfed.data.nifti_source import NiftiSource
from medfed.data.records import FileRecord, SkipReason
from medfed.data.scan import ScanReport, scan_folder, short_hash
from medfed.data.seg import seg_label_volume
from medfed.data.series import Series, label_source_of, series_from_plan
from medfed.data.volume import decode_volume

CACHE_DIRNAME = ".medfed-cache"
log = logging.getLogger("medfed.data")


class UnusableSeries(MedfedError):
    """A series listed from the headers whose pixels turned out not to decode.

    A task leaves such a series out (and says so) rather than failing the site.
    """


class DicomFolderSource:
    """The series of a DICOM folder, decoded once and then read from a cache.

    Images come back as :class:`monai.data.MetaTensor` of float32, shape
    ``(c, x, y, z)`` (see :class:`medfed.data.Series` for the axes), with an
    ``affine`` from voxel index to patient millimetres in DICOM's LPS frame
    (``meta["space"] == "LPS"``). Labels are int16 ``(1, x, y, z)`` on the same
    grid, from the manifest's NIfTI file or else the series' DICOM SEG.

    Parameters
    ----------
    root : Path
        The site's DICOM folder, any layout.
    cache_dir : Path, optional
        Where decoded series and the header index go; default
        ``root / ".medfed-cache"`` (hidden folders are never scanned).
    manifest : Path, optional
        Label manifest, see :mod:`medfed.data.labels`.
    progress : callable, optional
        ``progress(done, total)`` while headers are read.
    """

    def __init__(
        self,
        root: Path,
        *,
        cache_dir: Path | None = None,
        manifest: Path | None = None,
        progress: Progress | None = None,
    ) -> None:
        require_folder(root, allow_empty=True)
        self.root = root
        self.cache = SeriesCache(cache_dir if cache_dir is not None else root / CACHE_DIRNAME)
        self.manifest = manifest
        self._labels = load_manifest(manifest) if manifest is not None else {}
        self._progress = progress
        self._index: FolderIndex | None = None
        self._plans: dict[str, SeriesPlan] = {}
        self._records: dict[str, FileRecord] = {}
        #: Files whose headers read but whose pixels did not decode, with why; left out
        #: of the series (as `medfed site scan` leaves them out) until they change.
        self._set_aside: dict[str, tuple[FileRecord, FileProblem]] = {}

    def refresh(self) -> None:
        """Re-read the folder (only new or changed files are parsed again)."""
        self._index = index_folder(
            self.root,
            exclude=self._excluded(),
            index_file=self.cache.folder / "index.json",
            progress=self._progress,
        )
        self._records = {r.path: r for r in self._index.records}
        self._set_aside = {
            path: (record, problem)
            for path, (record, problem) in self._set_aside.items()
            if self._records.get(path) == record
        }  # changed: try it again
        self._assemble()

    def _assemble(self) -> None:
        assert self._index is not None
        plans, _ = assemble(r for r in self._index.records if r.path not in self._set_aside)
        self._plans = {p.series_uid: p for p in plans}

    def series(self) -> list[Series]:
        """The usable series, sorted by UID."""
        plans = self._current_plans()
        uids = frozenset(self._labels)
        return [series_from_plan(p, label_source=label_source_of(p, uids)) for p in plans.values()]

    def scan(self, *, decode: bool = True) -> ScanReport:
        """Scan the folder (every file decoded by default) and the cache; see :func:`scan_folder`.

        Damaged cache entries are removed (:meth:`SeriesCache.check`) and reported.
        """
        report = scan_folder(
            self.root, manifest=self.manifest, decode=decode, exclude=(self.cache.folder,)
        )
        return replace(report, cache=self.cache.check())

    def load(self, series_uid: str) -> tuple[MetaTensor, MetaTensor | None]:
        """The image and label (or ``None``) of one series, from the cache when it is current.

        Raises
        ------
        UnusableSeries
            A file of it does not decode (the headers read, the pixels do not).
        MedfedError
            Unknown series, or a label that does not fit the series.
        """
        while True:  # each pass sets aside one more file that does not decode
            plan = self._plan(series_uid)
            key = fingerprint(self.root, self._sources(plan))
            cached = self.cache.get(series_uid, key, shape=plan.shape)
            if cached is None:  # absent, stale or damaged: decode again from the DICOM files
                try:
                    cached = self._decode(plan)
                except FileProblem as problem:
                    self._set_aside_file(plan, problem)
                    continue
                self.cache.put(series_uid, key, cached)
            return _to_metatensors(cached, plan)

    def _set_aside_file(self, plan: SeriesPlan, problem: FileProblem) -> None:
        """Leave the file out and assemble again; none left to try: :class:`UnusableSeries`."""
        path = problem.path or plan.seg_file or ""
        record = self._records.get(path)
        log.warning(
            "a file of series %s left out: %s (%s)",
            short_hash(plan.series_uid),
            problem.reason.value,
            problem.detail,
        )
        if record is None or path in self._set_aside:  # cannot narrow it down further
            raise UnusableSeries(
                f"a file of series {short_hash(plan.series_uid)} cannot be used: "
                f"{problem.reason.value} ({problem.detail})",
                where=str(self.root),
                fix="run `medfed site scan` to find the file, then replace or remove it",
            ) from problem
        self._set_aside[path] = (record, problem)
        self._assemble()

    def _plan(self, series_uid: str) -> SeriesPlan:
        plans = self._current_plans()
        if series_uid in plans and not self._stale(plans[series_uid]):
            return plans[series_uid]
        self.refresh()
        if series_uid not in self._plans:
            left_out = [
                problem
                for record, problem in self._set_aside.values()
                if record.series_uid == series_uid
            ]
            if left_out:
                raise UnusableSeries(
                    f"series {short_hash(series_uid)} is unusable without its "
                    f"{len(left_out)} file(s) that do not decode: {left_out[-1].reason.value} "
                    f"({left_out[-1].detail})",
                    where=str(self.root),
                    fix="run `medfed site scan` to find the files, then replace or remove them",
                )
            raise MedfedError(
                "no usable series with this SeriesInstanceUID in the DICOM folder",
                where=f"{self.root} (series {short_hash(series_uid)})",
                expected=f"one of the {len(self._plans)} series listed by series()",
                fix="run `medfed site scan` to see which files were skipped and why",
            )
        return self._plans[series_uid]

    def _current_plans(self) -> dict[str, SeriesPlan]:
        if self._index is None:
            self.refresh()
        return self._plans

    def _stale(self, plan: SeriesPlan) -> bool:
        """Whether a source file changed since the folder was indexed."""
        for rel in self._sources(plan):
            record = self._records.get(rel)
            if record is None:
                continue  # a manifest label file: covered by the fingerprint
            try:
                stat = (self.root / rel).stat()
            except OSError:
                return True
            if (stat.st_size, stat.st_mtime_ns) != (record.size, record.mtime_ns):
                return True
        return False

    def _sources(self, plan: SeriesPlan) -> list[str]:
        sources = list(plan.files)
        if plan.series_uid in self._labels:
            sources.append(str(self._labels[plan.series_uid]))
        elif plan.seg_file:
            sources.append(plan.seg_file)
        return sources

    def _decode(self, plan: SeriesPlan) -> CachedSeries:
        """Decode image and label; a file that does not decode raises FileProblem (path set).

        A label that does not fit (the operator's manifest, not the files) raises
        MedfedError.
        """
        image = decode_volume(plan, self.root)
        try:
            label = self._label(plan)
        except FileProblem as problem:  # the series' DICOM SEG
            problem.path = plan.seg_file or ""
            raise
        except MedfedError:
            raise
        except Exception as exc:  # a SEG the reader did not foresee
            log.info("unexpected error reading a SEG", exc_info=True)
            raise FileProblem(
                SkipReason.UNEXPECTED, describe_error(exc), path=plan.seg_file or ""
            ) from exc
        return CachedSeries(image=image, affine=plan.affine, label=label)

    def _label(self, plan: SeriesPlan) -> np.ndarray | None:
        if plan.series_uid in self._labels:
            return nifti_label_volume(self._labels[plan.series_uid], plan.affine, plan.shape[1:])
        if plan.seg_file:
            record = self._records[plan.seg_file]
            return seg_label_volume(self.root / plan.seg_file, record, plan)
        return None

    def _excluded(self) -> tuple[Path, ...]:
        manifest = (self.manifest,) if self.manifest is not None else ()
        return (self.cache.folder, *manifest, *self._labels.values())


def scan_source(
    source: DataSourceConfig, *, decode: bool = True, progress: Progress | None = None
) -> ScanReport:
    """What `medfed site scan` reports: a folder source's files and its cache.

    A ``dicom-folder`` reads every file; a NIfTI source (``nifti-folder``, ``msd``,
    ``bids``) every scan its layout lists (:meth:`NiftiSource.scan`).

    Parameters
    ----------
    source : DataSourceConfig
        With absolute paths (:func:`medfed.data.check_source_available` returns it so).
    decode : bool
        Decode every file's pixel data too.
    progress : callable, optional
        ``progress(done, total)`` after each file.

    Returns
    -------
    ScanReport
        With ``cache`` set: damaged cache entries are removed (their series are
        decoded again at the next run) and counted.
    """
    if source.kind in NIFTI_KINDS:
        return NiftiSource(source).scan(decode=decode)
    if source.kind == "dicomweb":
        return _scan_pacs(source, decode=decode, progress=progress)
    root = Path(source.path)
    cache_dir = Path(source.cache_dir) if source.cache_dir else root / CACHE_DIRNAME
    report = scan_folder(
        root,
        manifest=Path(source.manifest) if source.manifest else None,
        decode=decode,
        exclude=(cache_dir,),
        progress=progress,
    )
    check = SeriesCache(cache_dir).check() if cache_dir.is_dir() else CacheCheck(entries=0)
    return replace(report, cache=check)


def _scan_pacs(source: DataSourceConfig, *, decode: bool, progress: Progress | None) -> ScanReport:
    """Fetch what is new from the PACS, then scan the mirror as a DICOM folder."""
    from dataclasses import asdict

    from medfed.data.dicomweb import PacsMirror

    mirror = PacsMirror(source)
    fetch = mirror.sync()
    report = scan_source(mirror.folder_source(), decode=decode, progress=progress)
    return replace(report, pacs=asdict(fetch), pacs_lines=tuple(fetch.render_lines()))


def load_series(paths: Sequence[Path]) -> tuple[MetaTensor, Series]:
    """Decode the given files as one series, without cache or labels.

    Parameters
    ----------
    paths : sequence of Path
        The files of one series, in any order.

    Returns
    -------
    image : MetaTensor
        float32 ``(c, x, y, z)`` with its LPS affine.
    series : Series

    Raises
    ------
    MedfedError
        A file is unusable, or the files do not form exactly one series.
    """
    from medfed.data.headers import read_record

    if not paths:
        raise MedfedError("no files given", expected="the DICOM files of one series")
    files = [Path(p).resolve() for p in paths]
    root = Path(os.path.commonpath([str(p.parent) for p in files]))
    results = [read_record(p, root) for p in files]
    bad = [r for r in results if not isinstance(r, FileRecord)]
    if bad:
        raise MedfedError(
            f"{len(bad)} file(s) cannot be used: {bad[0].reason.value} ({bad[0].detail})",
            where=str(root / bad[0].path),
            fix="remove the file or replace it with a readable copy",
        )
    plans, unusable = assemble([r for r in results if isinstance(r, FileRecord)])
    if unusable or len(plans) != 1:
        detail = unusable[0].reason.value if unusable else f"{len(plans)} series found"
        raise MedfedError(
            "the files do not form exactly one usable series",
            where=str(root),
            expected="files sharing one SeriesInstanceUID with regular slice geometry",
            fix=f"check the files ({detail})",
        )
    plan = plans[0]
    try:
        image = decode_volume(plan, root)
    except FileProblem as problem:
        raise MedfedError(
            f"a file cannot be decoded: {problem.reason.value} ({problem.detail})",
            where=str(root),
            fix="remove the file or replace it with a readable copy",
        ) from problem
    cached = CachedSeries(image=image, affine=plan.affine, label=None)
    return _to_metatensors(cached, plan)[0], series_from_plan(plan, label_source=None)


def _to_metatensors(cached: CachedSeries, plan: SeriesPlan) -> tuple[MetaTensor, MetaTensor | None]:
    affine = torch.as_tensor(np.asarray(cached.affine, dtype=np.float64))
    meta: dict[str, Any] = {
        "space": SpaceKeys.LPS,
        "original_channel_dim": 0,
        "spatial_shape": np.asarray(cached.image.shape[1:]),
        "series_uid": plan.series_uid,
        "modality": plan.modality,
    }
    image = MetaTensor(torch.from_numpy(cached.image), affine=affine, meta=dict(meta))
    if cached.label is None:
        return image, None
    label = MetaTensor(torch.from_numpy(cached.label[None]), affine=affine.clone(), meta=dict(meta))
    return image, label
