"""The global model a site last evaluated, kept so the next train message can name it.

Every round moves the new global model to a site twice: in the evaluate message that
scores it and in the next round's train message that starts from it. When the server
asks (``SiteInstruction.held_model`` on an evaluate message), the worker keeps that
model under the digest it computes itself; a train message then carries the digest
instead of the model (``server/model_reuse.py``). A site that does not hold it (its
daemon restarted) says so, and the server sends the model again.

One model per session (a run's attempt), at most :data:`KEEP_SESSIONS` sessions:
memory at the site is one model per active run.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import numpy as np

from medfed.core.packing import model_digest

KEEP_SESSIONS = 2


class HeldModels:
    """Per session: the digest and the arrays of the last model the server asked to keep."""

    def __init__(self, keep_sessions: int = KEEP_SESSIONS) -> None:
        self._keep = keep_sessions
        self._held: OrderedDict[str, tuple[str, dict[str, np.ndarray]]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, session: str, arrays: Mapping[str, np.ndarray]) -> str:
        """Keep ``arrays`` (read-only views) for ``session``; returns their digest."""
        frozen = {}
        for name, array in arrays.items():
            view = np.asarray(array).view()
            view.flags.writeable = False  # training must never change the kept model
            frozen[name] = view
        digest = model_digest(frozen)
        with self._lock:
            self._held.pop(session, None)
            self._held[session] = (digest, frozen)
            while len(self._held) > self._keep:
                self._held.popitem(last=False)
        return digest

    def get(self, session: str, digest: str) -> dict[str, np.ndarray] | None:
        """The arrays kept for ``session`` if their digest is ``digest``, else None."""
        with self._lock:
            held = self._held.get(session)
        if held is None or held[0] != digest:
            return None
        return dict(held[1])

    def forget(self, session: str) -> None:
        """Drop what is kept for ``session`` (its run ended)."""
        with self._lock:
            self._held.pop(session, None)
