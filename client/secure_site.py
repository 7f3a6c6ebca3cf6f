"""The site's side of secure aggregation: its identity key and one session per run.

The update that leaves the site is ``mask(local - global)``: the server can only
recover the sum over sites. Nothing here ever falls back to sending a plaintext
update: any failure refuses the round (fail closed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from medfed.core import wire
from medfed.core.errors import MedfedError
from medfed.core.identity import write_private
from medfed.core.secagg import Roster, SecAggConfig, SiteIdentity, SiteSession, UnmaskRequest

IDENTITY_FILE = "keys/secagg-identity.key"


def load_identity(site_dir: Path) -> SiteIdentity:
    """The site's long-term Ed25519 signing key (created owner-only on first use)."""
    path = site_dir / IDENTITY_FILE
    if not path.exists():
        write_private(path, SiteIdentity.generate().private_bytes())
    return SiteIdentity.from_private_bytes(path.read_bytes())


class SecureSite:
    """Secure-aggregation sessions of one site, by run."""

    def __init__(self, site: str, site_dir: Path) -> None:
        self.site = site
        self.site_dir = site_dir
        self._identity: SiteIdentity | None = None
        self._sessions: dict[str, SiteSession] = {}
        self._with_roster: set[str] = set()

    @property
    def identity(self) -> SiteIdentity:
        """Loaded on first use."""
        if self._identity is None:
            self._identity = load_identity(self.site_dir)
        return self._identity

    def join(self, run_id: str, config_json: str) -> dict[str, bytes]:
        """Start the run's session; returns the signed key advert and the identity key."""
        config = SecAggConfig.from_dict(json.loads(config_json))
        session = SiteSession(self.site, self.identity, config, run_id,
                              directory={self.site: self.identity.public_bytes})
        self._sessions[run_id] = session
        return {"advert": session.advertise().to_bytes(),
                "identity": self.identity.public_bytes}

    def session(self, run_id: str) -> SiteSession:
        """The run's session (it must have joined)."""
        if run_id not in self._sessions:
            raise MedfedError(
                f"Run {run_id} asks for a masked update but this site never joined its "
                "secure aggregation (the daemon may have restarted); the round is refused.",
                fix="the coordinator restarts the run")
        return self._sessions[run_id]

    def mask(self, run_id: str, rnd: int, config: dict[str, Any], blobs: dict[str, bytes],
             *, global_vec: np.ndarray, local_vec: np.ndarray, weight: float
             ) -> tuple[bytes, np.ndarray, dict[str, Any]]:
        """Mask ``local - global`` for round ``rnd``; returns header, vector, audit entry."""
        session = self.session(run_id)
        if run_id not in self._with_roster:  # first round: adopt the directory, then the roster
            directory = {s: bytes.fromhex(k) for s, k in
                         json.loads(str(config[wire.SECAGG_DIRECTORY])).items()}
            session.pin_directory(directory)
            session.accept_roster(Roster.from_bytes(blobs[wire.SECAGG_ROSTER]))
            self._with_roster.add(run_id)
        delta = local_vec.astype(np.float64) - global_vec.astype(np.float64)
        update = session.mask_update(
            rnd, delta.astype(np.float32), weight,
            participants=json.loads(str(config[wire.SECAGG_PARTICIPANTS])),
            deadline=float(config[wire.SECAGG_DEADLINE]))
        header, vector = update.to_parts()
        return header, vector, session.audit_entry(rnd)

    def reveal(self, run_id: str, request_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
        """Answer an unmasking request; returns the reveal and the audit entry to write first."""
        session = self.session(run_id)
        request = UnmaskRequest.from_bytes(request_bytes)
        reveal = session.reveal(request)
        return reveal.to_bytes(), session.audit_entry(request.server_round)
