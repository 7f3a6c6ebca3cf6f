"""The site's side of secure aggregation: its identity key and one session per run.

The update that leaves the site is ``mask(local - global)``: the server can only
recover the sum over sites. Nothing here ever falls back to sending a plaintext
update: any failure refuses the round (fail closed). A site daemon trusts a peer's
identity key only with a certificate the federation CA issued at enrolment
(key_certs.py), so the relay cannot substitute keys; in-process simulation, which has
no CA, pins them on first use (peer_pins.py). Each run's state is kept on disk until
the run ends (secagg_sessions.py), so a daemon restart does not drop the site from
its run.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from medfed.client.peer_pins import PINS_FILE, PeerPins
from medfed.client.secagg_sessions import KEEP_DAYS, SESSIONS_DIR, SessionStore
from medfed.core.errors import MedfedError
from medfed.core.identity import write_private, write_public
from medfed.core.key_certs import (
    SECAGG_PUBLIC_NAME,
    SECAGG_USAGE,
    CertificateRejected,
    check_key_cert,
    raw_public_bytes,
)
from medfed.core.schema import SecAggReply, SiteInstruction
from medfed.core.secagg import (
    ProtocolError,
    Roster,
    RosterError,
    SecAggConfig,
    SiteIdentity,
    SiteSession,
    UnmaskRequest,
    fingerprint,
)

IDENTITY_FILE = "keys/secagg-identity.key"
#: The public half, which the coordinator enrols beside keys/site.pub (PEM).
IDENTITY_PUBLIC_FILE = f"keys/{SECAGG_PUBLIC_NAME}"


def load_identity(site_dir: Path) -> SiteIdentity:
    """The site's long-term Ed25519 signing key (created owner-only on first use)."""
    path = site_dir / IDENTITY_FILE
    if not path.exists():
        write_private(path, SiteIdentity.generate().private_bytes())
    identity = SiteIdentity.from_private_bytes(path.read_bytes())
    public = site_dir / IDENTITY_PUBLIC_FILE
    if not public.exists():
        write_public(
            public,
            identity.private_key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    return identity


@dataclass
class _Run:
    session: SiteSession
    masked: dict[int, str] = field(default_factory=dict)  # round -> sha256 of the update
    restored: frozenset[int] = frozenset()  # rounds masked before a daemon restart
    #: Peers whose keys :meth:`SecureSite.accept_peers` pinned, for the next audit entry.
    pinned: dict[str, str] = field(default_factory=dict)

    def state(self) -> dict[str, Any]:
        return {
            "session": self.session.to_state(),
            "masked": {str(r): d for r, d in self.masked.items()},
        }


def _update_digest(delta: np.ndarray, weight: float) -> str:
    h = hashlib.sha256(memoryview(np.ascontiguousarray(delta)).cast("B"))  # no copy
    h.update(repr(float(weight)).encode())
    return h.hexdigest()


class BelowSiteMinimum(ProtocolError):
    """The run's threshold lets rounds through with fewer sites than this site masks with."""


class SecureSite:
    """Secure-aggregation sessions of one site, by run (in memory, mirrored on disk)."""

    def __init__(
        self,
        site: str,
        site_dir: Path,
        *,
        keep_days: float = KEEP_DAYS,
        min_participants: int = 2,
        federation_cas: Callable[[], list[x509.Certificate]] | None = None,
    ) -> None:
        self.site = site
        #: The CA certificates peers' identity keys must be certified by (read at each
        #: run's first round); None: no CA (simulation), peers pinned on first use.
        self.federation_cas = federation_cas
        self.min_participants = min_participants  # site.toml [privacy] secagg_min_participants
        self.site_dir = site_dir
        self.pins = PeerPins(site_dir / PINS_FILE)
        self.store = SessionStore(site_dir / SESSIONS_DIR)
        self.store.prune(keep_days)  # fallback for runs that never ended cleanly
        self._identity: SiteIdentity | None = None
        self._runs: dict[str, _Run] = {}

    @property
    def identity(self) -> SiteIdentity:
        """Loaded on first use."""
        if self._identity is None:
            self._identity = load_identity(self.site_dir)
        return self._identity

    def join(self, run_id: str, config_json: str) -> SecAggReply:
        """Start the run's session; returns the signed key advert and the identity key."""
        config = SecAggConfig.from_dict(json.loads(config_json))
        session = SiteSession(
            self.site,
            self.identity,
            config,
            run_id,
            directory={self.site: self.identity.public_bytes},
        )
        run = _Run(session)
        self.store.save(run_id, run.state())  # before the advert leaves: a restart keeps it
        self._runs[run_id] = run
        return SecAggReply(
            advert=session.advertise().to_bytes(), identity=self.identity.public_bytes
        )

    def _run(self, run_id: str) -> _Run:
        if run_id not in self._runs:  # after a daemon restart: resume from disk
            state = self.store.load(run_id)
            if state is None:
                raise MedfedError(
                    f"Run {run_id} asks for secure aggregation but this site holds no session "
                    "for it (it never joined, or the run ended); the round is refused.",
                    where=str(self.store.path(run_id)),
                    fix="the coordinator restarts the run",
                )
            try:
                masked = {int(r): str(d) for r, d in state["masked"].items()}
                session = SiteSession.from_state(self.identity, state["session"])
            except (KeyError, ValueError, TypeError, AttributeError) as exc:
                raise MedfedError(
                    f"The secure-aggregation state of run {run_id} is damaged ({exc!r}); "
                    "the round is refused.",
                    where=str(self.store.path(run_id)),
                    fix="the coordinator restarts the run",
                ) from None
            self._runs[run_id] = _Run(session, masked, frozenset(masked))
        return self._runs[run_id]

    def session(self, run_id: str) -> SiteSession:
        """The run's session (it must have joined; reloaded from disk after a restart)."""
        return self._run(run_id).session

    def end_run(self, run_id: str) -> None:
        """Forget the run: its secret key must not outlive it, in memory or on disk."""
        self._runs.pop(run_id, None)
        self.store.delete(run_id)

    def accept_peers(self, run_id: str, rnd: int, asked: SiteInstruction) -> None:
        """Check whom round ``rnd`` masks with; called before the site trains for it.

        In the run's first round: every peer's identity key in the directory is the one
        the federation CA certified for it (or, without a CA, the one pinned before),
        and the roster is the run's. Every round: the threshold meets this site's
        ``secagg_min_participants``. Raises :class:`RosterError` (a key not certified,
        a pinned key changed) or :class:`BelowSiteMinimum`, both the same every round of
        the run, or :class:`ProtocolError` (a malformed message).
        """
        run = self._run(run_id)
        session = run.session
        if not session.has_roster:  # first round: check the directory, then the roster
            if not asked.directory or not asked.roster:
                raise ProtocolError(
                    f"round {rnd} of run {run_id} is this site's first and came without the "
                    "run's secure-aggregation directory and roster",
                    where=f"site {self.site!r}",
                )
            directory = {s: bytes.fromhex(k) for s, k in asked.directory.items()}
            if self.federation_cas is not None:  # every key certified by the CA, or none used
                self._check_certified(directory, asked.certificates, run_id)
                held = self.pins.load()
                new = sorted(
                    s
                    for s, k in directory.items()
                    if s != self.site and (s not in held or held[s].key != k)
                )
            else:
                new = self.pins.check(directory, own=self.site)  # a changed key fails here
            session.pin_directory(directory)
            session.accept_roster(Roster.from_bytes(asked.roster))
            self.pins.add(directory, new, run_id=run_id)
            run.pinned = {s: fingerprint(directory[s]) for s in new}
        if session.threshold + 1 < self.min_participants:
            raise BelowSiteMinimum(
                f"run {run_id}'s secure-aggregation threshold ({session.threshold}) lets "
                f"rounds of {session.threshold + 1} sites through; this site masks its "
                f"update only with {self.min_participants} or more, and refuses the run",
                where=f"site {self.site!r}: site.toml [privacy] secagg_min_participants",
                fix="the coordinator raises --secagg-threshold to at least "
                f"{self.min_participants - 1}, or the site operator lowers "
                "secagg_min_participants",
            )

    def mask(
        self,
        run_id: str,
        rnd: int,
        asked: SiteInstruction,
        *,
        global_vec: np.ndarray,
        local_vec: np.ndarray,
        weight: float,
    ) -> tuple[bytes, np.ndarray, dict[str, Any]]:
        """Mask ``local - global`` for round ``rnd``; returns header, vector, audit entry."""
        self.accept_peers(run_id, rnd, asked)  # done before training; again after a restart
        run = self._run(run_id)
        session = run.session
        pinned, run.pinned = run.pinned, {}
        # One float32 pass, no model-sized float64 copies: IEEE subtraction gives the
        # correctly rounded difference (the float64 round trip's, whenever that was exact).
        delta = np.subtract(local_vec, global_vec, dtype=np.float32)
        digest = _update_digest(delta, weight)
        if rnd in run.masked:
            what = "this update" if run.masked[rnd] == digest else "a DIFFERENT update"
            raise ProtocolError(
                f"round {rnd} of run {run_id} was already masked and sent with {what}; the "
                "round is refused (two updates under one round's pairwise masks would reveal "
                "their difference to the server)",
                where=f"site {self.site!r}",
                fix="the round is lost for this site; it takes part again from the next one",
            )
        update = session.mask_update(
            rnd,
            delta,
            weight,
            participants=list(asked.participants),
            deadline=_deadline(asked, rnd, run_id),
        )
        run.masked[rnd] = digest
        self.store.save(run_id, run.state())  # recorded before the update leaves the site
        header, vector = update.to_parts()
        entry = session.audit_entry(rnd)
        if pinned:  # keys first seen (certified by the CA, or trusted on first use)
            entry["peers_certified" if self.federation_cas else "peers_pinned"] = pinned
        return header, vector, entry

    def _check_certified(
        self, directory: dict[str, bytes], pems: dict[str, str], run_id: str
    ) -> None:
        """Raise unless each key in ``directory`` is its site's, as the federation CA says."""
        cas = self.federation_cas() if self.federation_cas else []
        where = f"site {self.site!r}, run {run_id}"
        for site, relayed in sorted(directory.items()):
            if site not in pems:
                raise RosterError(
                    f"peer site {site!r}'s secure-aggregation identity key comes without a "
                    "certificate of the federation CA; the round is refused",
                    where=where,
                    fix=f"the coordinator enrols {site!r} again with its "
                    f"{IDENTITY_PUBLIC_FILE} (`medfed server enrol SITE.pub --name {site} "
                    "--secagg-key secagg-identity.pub`)",
                )
            try:
                certified = raw_public_bytes(
                    check_key_cert(
                        x509.load_pem_x509_certificate(str(pems[site]).encode()),
                        cas,
                        name=site,
                        usage=SECAGG_USAGE,
                        what=f"site {site!r}",
                    )
                )
            except (ValueError, CertificateRejected) as exc:
                raise RosterError(
                    f"peer site {site!r}'s secure-aggregation key is not "
                    f"certified: {exc}; the round is refused",
                    where=where,
                    fix="the coordinator checks the site's enrolment",
                ) from None
            if certified != relayed:
                raise RosterError(
                    f"the identity key relayed for site {site!r} ({fingerprint(relayed)}) is "
                    f"not the one the federation CA certified for it ({fingerprint(certified)})"
                    "; the round is refused",
                    where=where,
                    fix="stop the run: the relay may be substituting keys; if the site "
                    "re-keyed, the coordinator enrols its new secagg-identity.pub",
                )

    def reveal(self, run_id: str, request_bytes: bytes) -> tuple[bytes, dict[str, Any]]:
        """Answer an unmasking request; returns the reveal and the audit entry to write first."""
        run = self._run(run_id)
        request = UnmaskRequest.from_bytes(request_bytes)
        if request.server_round in run.restored:
            raise ProtocolError(
                f"round {request.server_round} was masked before the site daemon restarted; "
                "what this site revealed for it then is not known, so it reveals nothing "
                "(a second, different answer could expose its update)",
                where=f"site {self.site!r}, run {run_id}",
                fix="the round is lost; later rounds are unaffected",
            )
        reveal = run.session.reveal(request)
        return reveal.to_bytes(), run.session.audit_entry(request.server_round)


def _deadline(asked: SiteInstruction, rnd: int, run_id: str) -> float:
    if asked.deadline is None:
        raise ProtocolError(f"round {rnd} of run {run_id}'s train message has no deadline")
    return asked.deadline
