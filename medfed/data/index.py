"""Walk a site folder and read every file's header, reusing unchanged results.

The optional index file (JSON, inside the site's cache folder) keeps each
file's record or skip reason with its size and mtime, so later starts re-read
only new or changed files. It holds UIDs and paths and never leaves the site.
A damaged index file (or entry) is read again from the files' headers and
written anew; the replacement is logged and noted (:mod:`medfed.data.heal`).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.core.files import atomic_write
from medfed.data.headers import read_record
from medfed.data.heal import HealedFile, describe, note_healed
from medfed.data.records import (
    FileRecord,
    Skipped,
    SkipReason,
    skipped_from_json,
    skipped_to_json,
)

# 3: records carry a key of PatientID (2 had the ID itself); 4: float pixel data, transfer
# syntax checks and unexpected errors are read again rather than reused
_INDEX_VERSION = 4
Progress = Callable[[int, int], None]
log = logging.getLogger("medfed.data")


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
    known, damage = _load_index(index_file) if index_file and not decode else ({}, "")
    damaged_entries = 0
    records: list[FileRecord] = []
    skipped: list[Skipped] = []
    fresh: dict[str, dict[str, Any]] = {}
    changed = len(known) != len(files)
    for done, path in enumerate(files, start=1):
        rel = path.relative_to(root).as_posix()
        try:
            stat = path.stat()
        except OSError as exc:  # gone since the walk, a dangling link, no permission
            skipped.append(
                Skipped(rel, SkipReason.UNREADABLE, f"cannot read file ({describe(exc)})")
            )
            changed = True
            if progress is not None:
                progress(done, len(files))
            continue
        entry = known.get(rel)
        result = _reuse(entry, stat)
        if result is None and _unchanged(entry, stat):
            damaged_entries += 1
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
    if damaged_entries and not damage:
        damage = f"{damaged_entries} of its entries unreadable"
    if (
        index_file is not None
        and not decode
        and (changed or damage or fresh.keys() != known.keys())
    ):
        _write_index(index_file, fresh)
        if damage:
            note_healed(HealedFile(file=index_file.name, series_id="", reason=damage))
            log.warning(
                "replaced the damaged header index %s (%s): the headers were read "
                "again from the DICOM files",
                index_file.name,
                damage,
            )
    return FolderIndex(records=tuple(records), skipped=tuple(skipped))


def _unchanged(entry: Any, stat: os.stat_result) -> bool:
    """Whether ``entry`` is for the file as it is now (so a failed reuse means damage)."""
    return (
        isinstance(entry, dict)
        and entry.get("size") == stat.st_size
        and entry.get("mtime_ns") == stat.st_mtime_ns
    )


def _reuse(entry: dict[str, Any] | None, stat: os.stat_result) -> FileRecord | Skipped | None:
    """The stored result for an unchanged file, or ``None`` (changed, new or damaged entry)."""
    if entry is None or not _unchanged(entry, stat):
        return None
    try:
        if "record" in entry:
            return FileRecord.from_json(entry["record"])
        return skipped_from_json(entry["skipped"])
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def _load_index(path: Path) -> tuple[dict[str, dict[str, Any]], str]:
    """The stored entries by relative path, and why the file is damaged (``""`` if not).

    No file, or one of another version, is an empty index and no damage.
    """
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}, ""
    except (OSError, ValueError) as exc:  # ValueError: not UTF-8, not JSON (cut short)
        return {}, describe(exc)
    if not isinstance(data, dict):
        return {}, f"holds a JSON {type(data).__name__}, not an object"
    if data.get("version") != _INDEX_VERSION:
        return {}, ""  # another version's index: read again, quietly
    files = data.get("files")
    if not isinstance(files, dict):
        return {}, "its 'files' table is missing"
    return files, ""


def _write_index(path: Path, files: dict[str, dict[str, Any]]) -> None:
    """Write the index atomically (synced temporary file, then a rename)."""
    atomic_write(path, json.dumps({"version": _INDEX_VERSION, "files": files}).encode())
