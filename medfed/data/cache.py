"""Per-site cache of decoded series: one ``.npz`` per series, no pickle.

An entry is keyed by the series UID (its file name is a hash of it) and stores
the fingerprint of the source files it was decoded from: their relative
paths, sizes and modification times (ns). A changed, added or removed source
file changes the fingerprint, so the entry no longer matches and is rewritten
on the next load. Writes go to a temporary file in the cache folder and are
moved into place with :func:`os.replace`, so a reader never sees half a file.

An entry that cannot be read (cut short, overwritten, a flipped bit that fails
the archive's CRC, an array missing or of the wrong shape or type) is damaged:
it is removed and counts as a miss, so the series is decoded again from its DICOM
files and the entry written anew; the replacement is logged and noted for the
site's audit log (:mod:`medfed.data.heal`). A damaged entry never fails a load.
"""

from __future__ import annotations

import hashlib
import logging
import time
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.core.files import atomic_savez
from medfed.data.heal import CacheCheck, HealedFile, describe, note_healed
from medfed.data.scan import short_hash

log = logging.getLogger("medfed.data")

#: What reading a damaged ``.npz`` raises (numpy, zipfile, zlib and the OS).
_UNREADABLE = (
    OSError,
    EOFError,
    ValueError,
    KeyError,
    TypeError,
    AttributeError,
    zipfile.BadZipFile,
    zlib.error,
)
_ZIP_MAGIC = b"PK\x03\x04"  # how every .npz archive starts
#: A temporary file left by a writer that crashed is removed once this old (s).
STALE_TEMP_S = 3600.0


@dataclass(frozen=True)
class CachedSeries:
    """A decoded series as stored: image ``(c, x, y, z)``, affine, optional label."""

    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None


@dataclass
class CacheStats:
    """Counters since the cache object was made.

    ``damaged`` entries were found unreadable (each also counts as a miss);
    ``healed`` of them were written anew from the DICOM files.
    """

    hits: int = 0
    misses: int = 0
    writes: int = 0
    damaged: int = 0
    healed: int = 0


class DamagedEntry(Exception):
    """A cache entry that cannot be used; the message says why (no path)."""


def fingerprint(root: Path, paths: Iterable[str]) -> str:
    """Hash of the relative paths, sizes and mtimes (ns) of a series' source files."""
    digest = hashlib.sha256()
    for rel in sorted(set(paths)):
        stat = (root / rel).stat()
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def uid_key(series_uid: str) -> str:
    """File-name-safe key for a series UID."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:32]


def read_entry(path: Path) -> tuple[str, CachedSeries]:
    """The fingerprint and series stored in the entry at ``path``.

    Raises
    ------
    FileNotFoundError
        No entry.
    DamagedEntry
        The file is not a complete, well-formed entry.
    """
    try:
        with open(path, "rb") as fh:
            head = fh.read(len(_ZIP_MAGIC))
            if head != _ZIP_MAGIC:
                raise DamagedEntry(
                    "an empty file" if not head else f"not an .npz archive (starts with {head!r})"
                )
            fh.seek(0)
            with np.load(fh, allow_pickle=False) as data:
                stored = data["fingerprint"]
                image, affine, has_label = data["image"], data["affine"], data["has_label"]
                label = data["label"] if has_label.shape == () and bool(has_label) else None
    except FileNotFoundError:
        raise
    except _UNREADABLE as exc:
        raise DamagedEntry(describe(exc)) from exc
    if stored.shape != () or stored.dtype.kind != "U":
        raise DamagedEntry(f"fingerprint is {stored.dtype} {stored.shape}, not a string")
    if image.ndim != 4 or image.dtype != np.float32:
        raise DamagedEntry(f"image is {image.dtype} {image.shape}, not float32 (c, x, y, z)")
    if affine.shape != (4, 4) or affine.dtype.kind != "f" or not np.isfinite(affine).all():
        raise DamagedEntry(f"affine is {affine.dtype} {affine.shape}, not a finite 4x4")
    if has_label.shape != () or has_label.dtype != np.bool_:
        raise DamagedEntry(f"has_label is {has_label.dtype} {has_label.shape}, not a bool")
    if label is not None and (label.shape != image.shape[1:] or label.dtype != np.int16):
        raise DamagedEntry(
            f"label is {label.dtype} {label.shape}, not int16 {image.shape[1:]} like the image"
        )
    return str(stored), CachedSeries(image=image, affine=affine, label=label)


class SeriesCache:
    """Decoded series in a folder of ``.npz`` files.

    Parameters
    ----------
    folder : Path
        Created if missing.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.stats = CacheStats()
        self._damaged: dict[str, str] = {}  # series UID -> why its entry was removed
        folder.mkdir(parents=True, exist_ok=True)

    def entry_path(self, series_uid: str) -> Path:
        """Where the entry for ``series_uid`` lives."""
        return self.folder / f"series-{uid_key(series_uid)}.npz"

    def get(
        self,
        series_uid: str,
        source_fingerprint: str,
        *,
        shape: tuple[int, ...] | None = None,
    ) -> CachedSeries | None:
        """The cached series if present and made from the same source files, else ``None``.

        A damaged entry, or one whose image is not of ``shape`` (the series' shape
        from its headers) when given, is removed and counts as a miss; the next
        :meth:`put` of the series notes it as healed.
        """
        path = self.entry_path(series_uid)
        try:
            stored, found = read_entry(path)
            if shape is not None and found.image.shape != tuple(shape):
                raise DamagedEntry(
                    f"image is {found.image.shape}, the series' headers say {tuple(shape)}"
                )
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except DamagedEntry as damage:
            self._discard(series_uid, path, str(damage))
            self.stats.misses += 1
            return None
        if stored != source_fingerprint:  # the DICOM files changed since: not damage
            self.stats.misses += 1
            return None
        self.stats.hits += 1
        return found

    def put(self, series_uid: str, source_fingerprint: str, series: CachedSeries) -> Path:
        """Store a decoded series atomically, replacing any older entry."""
        path = atomic_savez(
            self.entry_path(series_uid),
            fingerprint=np.array(source_fingerprint),
            image=series.image,
            affine=series.affine,
            has_label=np.array(series.label is not None),
            label=series.label if series.label is not None else np.zeros(0, np.int16),
        )
        self.stats.writes += 1
        reason = self._damaged.pop(series_uid, None)
        if reason is not None:
            self.stats.healed += 1
            note_healed(HealedFile(file=path.name, series_id=short_hash(series_uid), reason=reason))
            log.warning(
                "replaced the damaged cache entry %s (series %s) with one decoded "
                "again from the DICOM files",
                path.name,
                short_hash(series_uid),
            )
        return path

    def check(self) -> CacheCheck:
        """Read every entry; remove the damaged ones and temporary files of crashed writers.

        What the scan runs: the series of a removed entry are decoded again at
        their next load. Entries are not compared with the DICOM files here.
        """
        damaged: list[HealedFile] = []
        entries = sorted(self.folder.glob("series-*.npz"))
        for path in entries:
            try:
                read_entry(path)
            except FileNotFoundError:
                continue  # removed meanwhile
            except DamagedEntry as damage:
                _remove(path)
                self.stats.damaged += 1
                damaged.append(HealedFile(file=path.name, series_id="", reason=str(damage)))
                log.warning(
                    "removed the damaged cache entry %s (%s); its series is decoded "
                    "again at its next load",
                    path.name,
                    damage,
                )
        return CacheCheck(
            entries=len(entries), damaged=tuple(damaged), leftovers=self._remove_leftovers()
        )

    def _discard(self, series_uid: str, path: Path, reason: str) -> None:
        _remove(path)
        self.stats.damaged += 1
        self._damaged[series_uid] = reason
        log.warning(
            "the cache entry %s (series %s) is damaged (%s); removed it, decoding the series again",
            path.name,
            short_hash(series_uid),
            reason,
        )

    def _remove_leftovers(self) -> int:
        """Remove temporary files that crashed writers left (old enough to be no one's)."""
        cutoff = time.time() - STALE_TEMP_S
        removed = 0
        patterns = (".series-*.npz.*", ".index.json.*", ".tmp-*.json")  # last: older medfed
        for path in (p for pattern in patterns for p in self.folder.glob(pattern)):
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # the next put replaces it anyway (or fails with the reason)
        log.warning("could not remove the damaged cache entry %s: %s", path.name, describe(exc))
