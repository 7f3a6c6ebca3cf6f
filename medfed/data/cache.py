"""Per-site cache of decoded series: one ``.npz`` per series, no pickle.

An entry is keyed by the series UID (its file name is a hash of it) and stores
the fingerprint of the source files it was decoded from: their relative
paths, sizes and modification times (ns). A changed, added or removed source
file changes the fingerprint, so the entry no longer matches and is rewritten
on the next load. Writes go to a temporary file in the cache folder and are
moved into place with :func:`os.replace`, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medfed.core.files import atomic_savez


@dataclass(frozen=True)
class CachedSeries:
    """A decoded series as stored: image ``(c, x, y, z)``, affine, optional label."""

    image: np.ndarray
    affine: np.ndarray
    label: np.ndarray | None


@dataclass
class CacheStats:
    """Counters since the cache object was made."""

    hits: int = 0
    misses: int = 0
    writes: int = 0


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
        folder.mkdir(parents=True, exist_ok=True)

    def entry_path(self, series_uid: str) -> Path:
        """Where the entry for ``series_uid`` lives."""
        return self.folder / f"series-{uid_key(series_uid)}.npz"

    def get(self, series_uid: str, source_fingerprint: str) -> CachedSeries | None:
        """The cached series if present and made from the same source files, else ``None``."""
        path = self.entry_path(series_uid)
        try:
            with np.load(path, allow_pickle=False) as data:
                if str(data["fingerprint"]) != source_fingerprint:
                    self.stats.misses += 1
                    return None
                label = data["label"] if bool(data["has_label"]) else None
                found = CachedSeries(image=data["image"], affine=data["affine"], label=label)
        except (OSError, KeyError, ValueError):  # absent, or a damaged entry: decode again
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
        return path
