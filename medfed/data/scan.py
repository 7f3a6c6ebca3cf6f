"""Scan a site folder and report what can be used, with no patient identifiers.

The report holds counts, shapes, spacings, modalities and transfer syntaxes.
Series are named by a short hash of their UID and files by a short hash of
their relative path (folder names often carry patient names); the paths are
kept in the object and shown only when asked for, on the site's own terminal.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID

from medfed.core.files import atomic_write
from medfed.data.assemble import assemble
from medfed.data.available import require_folder
from medfed.data.heal import CacheCheck
from medfed.data.index import Progress, index_folder
from medfed.data.labels import load_manifest
from medfed.data.series import label_source_of

_SALT = b"medfed-scan-v1\0"


def short_hash(text: str) -> str:
    """12 hex characters identifying ``text`` without revealing it."""
    return hashlib.sha256(_SALT + text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SeriesSummary:
    """One usable series, without identifiers."""

    series_id: str
    modality: str
    shape: tuple[int, int, int, int]
    spacing: tuple[float, float, float]
    slices: int
    files: int
    geometry: str
    label: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class SkippedFile:
    """One file left out; ``path`` is shown only on request."""

    file_id: str
    path: str
    reason: str
    detail: str


@dataclass(frozen=True)
class ScanReport:
    """What a scan found: usable series and skipped files (and the cache, when checked)."""

    files_total: int
    series: tuple[SeriesSummary, ...]
    skipped: tuple[SkippedFile, ...]
    cache: CacheCheck | None = None
    #: What a remote source (a PACS) said and what was fetched: counts, and lines to show.
    pacs: dict[str, Any] | None = None
    pacs_lines: tuple[str, ...] = ()

    @property
    def files_used(self) -> int:
        """Files that belong to a usable series (or label one)."""
        return self.files_total - len(self.skipped)

    def skipped_by_reason(self) -> dict[str, int]:
        """Count of skipped files per reason, most frequent first."""
        return dict(Counter(s.reason for s in self.skipped).most_common())

    def to_dict(self, *, include_paths: bool = False) -> dict[str, Any]:
        """JSON-ready dict; file paths only with ``include_paths`` (keep those at the site)."""
        cache = (
            {}
            if self.cache is None
            else {
                "cache": {
                    "entries": self.cache.entries,
                    "damaged_removed": [
                        {**({"file": d.file} if include_paths else {}), "reason": d.reason}
                        for d in self.cache.damaged
                    ],
                    "temporary_files_removed": self.cache.leftovers,
                }
            }
        )
        return {
            "files_total": self.files_total,
            "files_used": self.files_used,
            "files_skipped": len(self.skipped),
            "skipped_by_reason": self.skipped_by_reason(),
            "series": [
                {
                    "series_id": s.series_id,
                    "modality": s.modality,
                    "shape": list(s.shape),
                    "spacing_mm": [round(v, 4) for v in s.spacing],
                    "slices": s.slices,
                    "files": s.files,
                    "geometry": s.geometry,
                    "label": s.label,
                    "transfer_syntaxes": list(s.transfer_syntaxes),
                }
                for s in self.series
            ],
            "skipped": [
                {
                    "file": f.path if include_paths else f.file_id,
                    "reason": f.reason,
                    "detail": f.detail,
                }
                for f in self.skipped
            ],
            **cache,
            **({"pacs": self.pacs} if self.pacs is not None else {}),
        }

    def render_text(self, *, include_paths: bool = False) -> str:
        """A plain-text summary for the terminal."""
        lines = [
            *self.pacs_lines,
            f"{self.files_total} files: {self.files_used} used, {len(self.skipped)} skipped; "
            f"{len(self.series)} series",
        ]
        for s in self.series:
            shape = "x".join(str(v) for v in s.shape[1:])
            spacing = " x ".join(f"{v:.3g}" for v in s.spacing)
            channels = f", {s.shape[0]} channels" if s.shape[0] != 1 else ""
            lines.append(
                f"  series {s.series_id}  {s.modality:<6} {shape} voxels{channels}, "
                f"{spacing} mm, {s.slices} slices, label: {s.label}"
            )
        if self.skipped:
            lines.append("skipped:")
            for reason, count in self.skipped_by_reason().items():
                lines.append(f"  {count:5d}  {reason}")
            for f in self.skipped:
                name = f.path if include_paths else f.file_id
                lines.append(f"    {name}: {f.reason}" + (f" ({f.detail})" if f.detail else ""))
        if self.cache is not None:
            lines.append(_render_cache(self.cache))
        return "\n".join(lines)

    def write_json(self, path: Path, *, include_paths: bool = False) -> Path:
        """Write :meth:`to_dict` as JSON, atomically."""
        text = json.dumps(self.to_dict(include_paths=include_paths), indent=2) + "\n"
        return atomic_write(path, text.encode())


def scan_folder(
    path: Path,
    *,
    manifest: Path | None = None,
    decode: bool = True,
    exclude: tuple[Path, ...] = (),
    progress: Progress | None = None,
) -> ScanReport:
    """Read every file under ``path`` and report usable series and skipped files.

    Parameters
    ----------
    path : Path
        The site's DICOM folder (any layout of studies and series).
    manifest : Path, optional
        Label manifest (see :mod:`medfed.data.labels`); it and its label files
        are not scanned as DICOM.
    decode : bool
        Decode every file's pixel data too (finds corrupt compressed streams).
    exclude : tuple of Path
        More files or folders to leave out, e.g. the cache folder.
    progress : callable, optional
        ``progress(done, total)`` after each file.

    Returns
    -------
    ScanReport
        Never raises for a bad DICOM file; a bad manifest raises MedfedError, a
        missing folder ConfigError.
    """
    require_folder(path, allow_empty=True)
    labels = load_manifest(manifest) if manifest is not None else {}
    skip_paths = (*exclude, *labels.values(), *((manifest,) if manifest else ()))
    index = index_folder(path, decode=decode, exclude=skip_paths, progress=progress)
    plans, unusable = assemble(index.records)
    manifest_uids = frozenset(labels)
    summaries = tuple(
        SeriesSummary(
            series_id=short_hash(p.series_uid),
            modality=p.modality,
            shape=p.shape,
            spacing=p.spacing,
            slices=len(p.frames),
            files=len(p.files),
            geometry=p.geometry,
            label=label_source_of(p, manifest_uids) or "none",
            transfer_syntaxes=tuple(UID(t).name for t in p.transfer_syntaxes),
        )
        for p in plans
    )
    skipped = tuple(
        SkippedFile(file_id=short_hash(s.path), path=s.path, reason=s.reason.value, detail=s.detail)
        for s in sorted((*index.skipped, *unusable), key=lambda s: s.path)
    )
    return ScanReport(files_total=index.n_files, series=summaries, skipped=skipped)


def _render_cache(check: CacheCheck) -> str:
    line = f"cache: {check.entries} decoded series"
    if check.damaged:
        line += (
            f", {len(check.damaged)} damaged entries removed (decoded again from the "
            "DICOM files at the next run)"
        )
        for d in check.damaged:
            line += f"\n    {d.file}: {d.reason}"
    else:
        line += ", all readable"
    if check.leftovers:
        line += f"; {check.leftovers} temporary files of interrupted writes removed"
    return line
