"""The parameters a site keeps to itself under a domain-adaptation hook, per run, on disk.

They never leave the site. Written after every training round (before the
round's reply), so a daemon restart mid-run resumes with the site's own
parameters instead of silently starting them over. After the run, the file and
the run's global checkpoint together are this site's model.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from medfed.core.files import atomic_savez

FOLDER = "site-local"
#: Runs whose parameters stay in memory (a daemon serves runs for months).
CACHED_RUNS = 4


class SiteLocalStore:
    """``<site folder>/site-local/run-<id><suffix>.npz``: one file per run.

    ``suffix`` names another kind of per-run site state kept the same way, e.g.
    ``".scaffold"``: SCAFFOLD's control variate of the site (never sent either).
    """

    def __init__(self, site_dir: Path, *, suffix: str = "") -> None:
        if suffix and not re.fullmatch(r"\.[a-z0-9-]{1,32}", suffix):
            raise ValueError(f"invalid site-local suffix {suffix!r}")
        self.folder = Path(site_dir) / FOLDER
        self.suffix = suffix
        self._cache: dict[str, dict[str, np.ndarray]] = {}  # read from disk once per run

    def path(self, run_id: str) -> Path:
        """The file of ``run_id`` (the id is checked: it becomes part of a path)."""
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", run_id):
            raise ValueError(f"invalid run id {run_id!r} for a file name")
        return self.folder / f"run-{run_id}{self.suffix}.npz"

    def load(self, run_id: str) -> dict[str, np.ndarray] | None:
        """The run's site-local parameters, or None before its first training round."""
        if run_id not in self._cache:
            path = self.path(run_id)
            if not path.exists():
                return None
            with np.load(path, allow_pickle=False) as stored:
                self._cache[run_id] = {k: stored[k] for k in stored.files}
        return {k: v.copy() for k, v in self._cache[run_id].items()}

    def save(self, run_id: str, params: dict[str, np.ndarray]) -> Path:
        """Replace the run's site-local parameters (atomic; a crash keeps the old file)."""
        path = atomic_savez(self.path(run_id), **params)
        self._cache.pop(run_id, None)
        self._cache[run_id] = {k: np.array(v, copy=True) for k, v in params.items()}
        while len(self._cache) > CACHED_RUNS:  # the least recently written run leaves memory
            self._cache.pop(next(iter(self._cache)))
        return path
