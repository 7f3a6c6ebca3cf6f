"""Crash-safe file writes: a reader sees the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

import numpy as np


def _atomic(path: Path, write: Callable[[IO[bytes]], None], *, suffix: str = "") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a synced temporary file and a rename."""
    return _atomic(path, lambda fh: fh.write(data))


def sync_filesystem(path: Path) -> None:
    """Flush to disk everything written on the filesystem that holds ``path`` (syncfs).

    One journal commit for many files written unsynced, instead of an fsync each.
    """
    import ctypes
    import ctypes.util

    fd = os.open(path, os.O_RDONLY)
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        if libc.syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs failed", str(path))
    except AttributeError:  # no syncfs (not Linux): flush every filesystem
        os.sync()
    finally:
        os.close(fd)


def atomic_savez(path: Path, **arrays: np.ndarray) -> Path:
    """Write numpy arrays as ``.npz`` (no pickle) atomically."""
    return _atomic(path, lambda fh: np.savez(fh, **arrays), suffix=".npz")
