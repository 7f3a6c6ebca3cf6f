"""The last update a site released per run, kept to send again if the server loses it.

A server that crashes after the sites trained round k resumes from round k-1's model
and asks for round k again (:mod:`medfed.server.resume`). Training again would be a
second release of the site's data: under DP a second charge, or, charged once, an
epsilon that no longer bounds what left. Instead the site sends the same update again
(masked under the resumed run's fresh keys): nothing new leaves, so nothing new is
spent, and the ledger counts the resend on the round's one spend
(:meth:`PrivacyLedger.mark_resent`).

The update is the vector after training and update-level DP, before masking: exactly
what the first reply carried inside its masked vector. It is kept with the SHA-256 of
the global model it was trained from, of the run's configuration, and the round's
secure-aggregation participants, and sent again only for that same model in that same
run, to the same participants: the server then learns the same sum as before, nothing
more (summed with other sites, the same update would let it subtract sums). Otherwise
the round is trained and charged anew. Only
the run's last round is kept (a resumed run redoes at most the round it lost); the
file goes when the run ends. Written atomically before the ledger commit and the
reply, so a round whose update may have left always has it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.core.config import RunConfig
from medfed.core.files import atomic_savez
from medfed.core.schema import SiteInstruction


def run_digest(run: RunConfig) -> str:
    """SHA-256 of a run's configuration, whether or not it was resumed."""
    text = run.model_copy(update={"resume_of": ""}).to_json()
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def participants_of(asked: SiteInstruction) -> tuple[str, ...]:
    """The round's secure-aggregation participants a train message names, sorted."""
    return tuple(sorted(asked.participants))


def model_digest(vector: np.ndarray) -> str:
    """SHA-256 of a global model's packed float32 vector."""
    return (
        "sha256:"
        + hashlib.sha256(
            memoryview(np.ascontiguousarray(vector, dtype=np.float32)).cast("B")
        ).hexdigest()
    )


@dataclass(frozen=True)
class Released:
    """One released update and what its reply said."""

    round: int
    run_digest: str  # the run configuration it was trained under
    global_digest: str
    participants: tuple[str, ...]  # the round's secure-aggregation sites (none: off)
    vector: np.ndarray
    weight: float
    metrics: dict[str, Any]
    privacy: dict[str, Any]  # the audit record's privacy part (ledger record, epsilon)


class ReleasedUpdates:
    """``privacy/released/`` of a site: one file per run."""

    def __init__(self, site_dir: Path) -> None:
        self.dir = Path(site_dir) / "privacy" / "released"

    def _path(self, run_id: str) -> Path:
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in str(run_id))
        return self.dir / f"run-{safe}.npz"

    def save(self, run_id: str, update: Released) -> None:
        """Keep ``update`` as the run's last release (replacing the one before)."""
        meta = {
            "round": update.round,
            "run": update.run_digest,
            "global": update.global_digest,
            "participants": list(update.participants),
            "weight": update.weight,
            "metrics": update.metrics,
            "privacy": update.privacy,
        }
        atomic_savez(
            self._path(run_id),
            vector=np.asarray(update.vector, dtype=np.float32),
            meta=np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8),
        )

    def matching(
        self,
        run_id: str,
        run: RunConfig,
        rnd: int,
        global_vec: np.ndarray,
        participants: tuple[str, ...],
    ) -> Released | None:
        """The release of round ``rnd`` if it was trained under ``run`` from ``global_vec``.

        An unreadable file is no release (the round is trained and charged anew).
        """
        path = self._path(run_id)
        if not path.exists():
            return None
        try:
            with np.load(path, allow_pickle=False) as stored:
                meta = json.loads(stored["meta"].tobytes().decode())
                # The vector (a model's size) is read only for the round it answers:
                # on every other round the file holds the round before.
                if (
                    int(meta["round"]) != int(rnd)
                    or meta.get("run") != run_digest(run)
                    or tuple(meta.get("participants", ())) != tuple(participants)
                    or meta["global"] != model_digest(global_vec)
                ):
                    return None
                vector = stored["vector"]
        except (OSError, ValueError, KeyError):
            return None
        return Released(
            int(meta["round"]),
            meta["run"],
            meta["global"],
            tuple(meta["participants"]),
            vector,
            float(meta["weight"]),
            dict(meta["metrics"]),
            dict(meta["privacy"]),
        )

    def forget(self, run_id: str) -> None:
        """The run ended: its last release is no longer needed."""
        self._path(run_id).unlink(missing_ok=True)
