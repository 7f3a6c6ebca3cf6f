"""Walk a site folder and read every file's header, reusing unchanged results.

The optional index file (JSON, inside the site's cache folder) keeps each
file's record or skip reason with its size and mtime, so later starts re-read
only new or changed files. It holds UIDs and paths and never leaves the site.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.data.headers import read_record
from medfed.data.records import (
    FileRecord,
    Skipped,
    skipped_from_json,
    skipped_to_json,
)

_INDEX_VERSION = 3  # 3: records carry a key of PatientID (2 had the ID itself)
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class FolderIndex:
    """Readable image files and skipped files of one folder, both sorted by path."""

    records: tuple[FileRecord, ...]
    skipped: tuple[Skipped, ...]

    @property
    def n_files(self) -> int:
        """Number of files looked at."""
        return len(self.records) + len(self.skipped)


def iter_files(root: Path, *, exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Every regular file under ``root`` in a stable order, hidden files and ``exclude`` aside."""
    excluded = {p.resolve() for p in exclude}
    for folder, dirs, files in os.walk(root):
        here = Path(folder)
        real = here.resolve()  # once per folder, not per file
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and real / d not in excluded)
        for name in sorted(files):
            if not name.startswith(".") and real / name not in excluded:
                yield here / name


def index_folder(
    root: Path,
    *,
    decode: bool = False,
    exclude: Iterable[Path] = (),
    index_file: Path | None = None,
    progress: Progress | None = None,
) -> FolderIndex:
    """Read the header of every file under ``root``.

    Parameters
    ----------
    root : Path
        The site folder.
    decode : bool
        Also decode pixel data (thorough, slow); results are then not stored
        in ``index_file``.
    exclude : iterable of Path
        Files or folders to leave out (the cache folder, label files).
    index_file : Path, optional
        JSON file of earlier results to reuse and update.
    progress : callable, optional
        Called as ``progress(done, total)`` after each file.

    Returns
    -------
    FolderIndex
    """
    files = list(iter_files(root, exclude=exclude))
    known = _load_index(index_file) if index_file and not decode else {}
    records: list[FileRecord] = []
    skipped: list[Skipped] = []
    fresh: dict[str, dict[str, Any]] = {}
    changed = len(known) != len(files)
    for done, path in enumerate(files, start=1):
        rel = path.relative_to(root).as_posix()
        stat = path.stat()
        entry = known.get(rel)
        result = _reuse(entry, stat)
        if result is None or entry is None:
            changed = True
            result = read_record(path, root, decode=decode)
            entry = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
            if isinstance(result, FileRecord):
                entry["record"] = result.to_json()
            else:
                entry["skipped"] = skipped_to_json(result)
        if isinstance(result, FileRecord):
            records.append(result)
        else:
            skipped.append(result)
        fresh[rel] = entry
        if progress is not None:
            progress(done, len(files))
    if index_file is not None and not decode and (changed or fresh.keys() != known.keys()):
        _write_index(index_file, fresh)
    return FolderIndex(records=tuple(records), skipped=tuple(skipped))


def _reuse(entry: dict[str, Any] | None, stat: os.stat_result) -> FileRecord | Skipped | None:
    """The stored result for an unchanged file, or ``None`` (changed, new or damaged entry)."""
    if not entry or entry.get("size") != stat.st_size or entry.get("mtime_ns") != stat.st_mtime_ns:
        return None
    try:
        if "record" in entry:
            return FileRecord.from_json(entry["record"])
        return skipped_from_json(entry["skipped"])
    except (KeyError, TypeError, ValueError):
        return None


def _load_index(path: Path) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != _INDEX_VERSION:
            return {}
        return dict(data["files"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _write_index(path: Path, files: dict[str, dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"version": _INDEX_VERSION, "files": files}, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
