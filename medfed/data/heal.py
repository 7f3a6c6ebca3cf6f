"""Damaged derived files at a site: discarded, derived again from the source, and told.

The data path derives two kinds of files from a site's DICOM folder, both in its
cache folder: the decoded series (``series-*.npz``) and the header index
(``index.json``). Neither is ever the only copy of anything, so a damaged one (a
disk error, a copy cut short, a full disk under another program) is never a
failure: it is discarded, derived again from the DICOM files, logged as a warning
on the ``medfed.data`` logger (the site's log), and noted here so that the site
worker can write it into the site's audit log (:func:`take_healed`).

A note names the file inside the cache folder and the series by the short hash of
its UID (as the scan report does); it holds no path and no patient identifier.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass

#: Notes kept until taken; older ones are dropped (they are in the log as well).
MAX_NOTES = 1000


@dataclass(frozen=True)
class HealedFile:
    """A derived file found damaged and derived again from the DICOM files.

    Attributes
    ----------
    file : str
        Its name inside the cache folder, e.g. ``series-<hash>.npz`` or ``index.json``.
    series_id : str
        Short hash of the series' UID (as in the scan report); ``""`` for the index.
    reason : str
        What was wrong with it, e.g. ``"BadZipFile: File is not a zip file"``.
    """

    file: str
    series_id: str
    reason: str


@dataclass(frozen=True)
class CacheCheck:
    """What a check of the cache folder found (``medfed site scan`` runs one).

    Attributes
    ----------
    entries : int
        Cache entries read.
    damaged : tuple of HealedFile
        Entries found damaged and removed; their series are decoded again at their
        next load (``series_id`` is empty: a file name does not give the UID back).
    leftovers : int
        Temporary files of crashed writers removed.
    """

    entries: int
    damaged: tuple[HealedFile, ...] = ()
    leftovers: int = 0


_lock = threading.Lock()
_notes: deque[HealedFile] = deque(maxlen=MAX_NOTES)


def note_healed(healed: HealedFile) -> None:
    """Record that ``healed`` was replaced (called by the cache and the index)."""
    with _lock:
        _notes.append(healed)


def take_healed() -> tuple[HealedFile, ...]:
    """The files healed in this process since the last call, oldest first."""
    with _lock:
        taken = tuple(_notes)
        _notes.clear()
    return taken


def describe(exc: BaseException) -> str:
    """What went wrong reading a file, without the file's path."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"  # str(exc) would name the path
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
