"""Per-run secure-aggregation state on disk, so a site daemon restart keeps its run.

Each file holds the run's secret X25519 key: owner-only, written atomically, and
deleted when the run ends (kept secrets plus stored masked updates would let
someone unmask one site's update). Files of runs that never ended are pruned.
"""

from __future__ import annotations

import json
import re
import time
from hashlib import sha256
from pathlib import Path
from typing import Any

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_write

SESSIONS_DIR = "secagg/sessions"
KEEP_DAYS = 30.0
_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


class SessionStore:
    """One JSON file per run under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, run_id: str) -> Path:
        """The run's file; a run id that is not a plain name is hashed (no path tricks)."""
        name = run_id if _SAFE.fullmatch(run_id) else "h-" + sha256(run_id.encode()).hexdigest()
        return self.root / f"{name}.json"

    def save(self, run_id: str, state: dict[str, Any]) -> None:
        """Write atomically and fsync'd; mkstemp creates the file 0600 and rename keeps it."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        atomic_write(self.path(run_id), json.dumps(state).encode())

    def load(self, run_id: str) -> dict[str, Any] | None:
        """The run's state, or None when this site holds none."""
        path = self.path(run_id)
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise MedfedError(
                f"The secure-aggregation state of run {run_id} is unreadable: "
                f"{exc}; the round is refused.",
                where=str(path),
                fix="the run cannot continue at this site: the coordinator "
                "restarts it (the file can then be deleted)",
            ) from None
        if not isinstance(state, dict):
            raise MedfedError(
                f"The secure-aggregation state of run {run_id} is not a JSON "
                "object; the round is refused.",
                where=str(path),
            )
        return state

    def delete(self, run_id: str) -> bool:
        """Remove the run's file; True if there was one."""
        path = self.path(run_id)
        existed = path.exists()
        path.unlink(missing_ok=True)
        return existed

    def prune(self, keep_days: float = KEEP_DAYS, *, now: float | None = None) -> list[Path]:
        """Delete files not written for ``keep_days`` (runs that never ended cleanly).

        Temporary files a killed write left behind hold the same secrets: pruned too.
        """
        if not self.root.is_dir():
            return []
        cutoff = (time.time() if now is None else now) - keep_days * 86400
        old = [p for p in self.root.iterdir() if p.is_file() and p.stat().st_mtime < cutoff]
        for path in old:
            path.unlink(missing_ok=True)
        return old
