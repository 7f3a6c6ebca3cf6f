"""The site's audit log: one fsync'ed JSON line per decision and per outbound reply.

Written BEFORE the reply leaves the site, so the log never misses what was sent.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np


def arrays_digest(arrays: dict[str, np.ndarray]) -> tuple[str, int]:
    """SHA-256 over names and bytes of ``arrays``, and their total size in bytes."""
    h = hashlib.sha256()
    size = 0
    for name in sorted(arrays):
        data = np.ascontiguousarray(arrays[name]).tobytes()
        h.update(name.encode())
        h.update(data)
        size += len(data)
    return "sha256:" + h.hexdigest(), size


class AuditLog:
    """Append-only JSON-lines audit log of a site."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def record(self, event: str, **fields: Any) -> dict[str, Any]:
        """Append one record and fsync it; returns the record."""
        entry = {"time": dt.datetime.now(dt.timezone.utc).isoformat(), "event": event, **fields}
        line = json.dumps(entry, sort_keys=True) + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return entry

    def read(self) -> list[dict[str, Any]]:
        """All records, oldest first (a torn last line from a crash is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out
