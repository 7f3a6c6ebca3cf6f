"""Which server run each signed launch was trained as: a replayed launch is refused.

A coordinator's proof carries a fresh nonce (core/run_proof.py), so each launch has
its own proof. A SuperLink that was broken into could still start a signed run again
under a new server run id and make the site spend budget twice on one launch; the
site keeps the first server run each proof came with (one JSON file, written before
the site acts on the run) and refuses the proof under any other.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_write
from medfed.core.run_proof import RunProofError, VerifiedRun

SIGNED_RUNS_FILE = "keys/signed-runs.json"


class SignedRuns:
    """Proof digest -> the server run it was first seen with (``keys/signed-runs.json``)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._seen: dict[str, dict[str, str]] | None = None

    def _load(self) -> dict[str, dict[str, str]]:
        if self._seen is None:
            if not self.path.exists():
                self._seen = {}
            else:
                try:
                    self._seen = dict(json.loads(self.path.read_text(encoding="utf-8"))["runs"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise MedfedError(  # fail closed: without it a replay goes unseen
                        f"The record of signed runs is unreadable ({exc}); no run is "
                        "accepted until it is fixed.",
                        where=str(self.path),
                        expected='{"runs": {proof digest: {"server_run", "coordinator", '
                        '"first_seen"}}}',
                        fix="restore it from a backup",
                    ) from None
        return self._seen

    def claim(self, verified: VerifiedRun, server_run: str) -> None:
        """Accept the proof for ``server_run``; :class:`RunProofError` if it came with another."""
        with self._lock:
            seen = self._load()
            first = seen.get(verified.digest)
            if first is None:
                seen[verified.digest] = {
                    "server_run": server_run,
                    "coordinator": verified.coordinator,
                    "first_seen": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                }
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps({"runs": seen}, indent=1).encode())
            elif first["server_run"] != server_run:
                raise RunProofError(
                    f"coordinator {verified.coordinator!r}'s launch was already trained as "
                    f"server run {first['server_run']} (first seen {first['first_seen']}); "
                    f"server run {server_run} replays it and is refused"
                )
