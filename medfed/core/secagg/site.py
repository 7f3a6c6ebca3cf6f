"""Site side of secure aggregation: key advert, roster check, masking, reveals, audit."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from medfed.core.secagg import prg, shamir
from medfed.core.secagg.config import FixedPoint, SecAggConfig
from medfed.core.secagg.errors import LateUpdateError, ProtocolError, RosterError
from medfed.core.secagg.identity import SiteIdentity, check_directory
from medfed.core.secagg.messages import (
    DIGEST,
    KeyAdvert,
    MaskedUpdate,
    Reveal,
    Roster,
    UnmaskRequest,
    vector_digest,
)
from medfed.core.secagg.quantize import encode

_AEAD_NONCE = bytes(12)  # every share key encrypts exactly one share


def verify_roster(roster: Roster, run_id: str, directory: Mapping[str, bytes]) -> None:
    """Check every advert: right run, enrolled site, valid identity signature, no duplicates."""
    if roster.run_id != run_id:
        raise RosterError(f"the roster is for run {roster.run_id!r}, this is run {run_id!r}")
    seen: set[str] = set()
    for advert in roster.adverts:
        where = f"site {advert.site_id!r}"
        if advert.site_id in seen:
            raise RosterError("the roster lists a site twice", where=where)
        seen.add(advert.site_id)
        if advert.run_id != run_id:
            raise RosterError(
                f"key advert is for run {advert.run_id!r}",
                where=where,
                expected=f"run {run_id!r} (keys are fresh per run)",
            )
        if advert.site_id not in directory:
            raise RosterError(
                "key advert from a site that is not enrolled",
                where=where,
                fix="enrol the site's identity with the coordinator",
            )
        if len(advert.public_key) != 32 or not SiteIdentity.verify(
            directory[advert.site_id], advert.signature, advert.signed_payload()
        ):
            raise RosterError(
                "key advert signature does not verify against the enrolled identity key",
                where=where,
                expected="an advert signed by the site itself",
                fix="the relay altered or substituted the key: stop the run and investigate",
            )


def _canonical(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(ids), key=lambda s: s.encode()))


@dataclass
class _SiteRound:
    participants: tuple[str, ...]
    digest: bytes
    n_bytes: int
    weight: float
    clipped: int
    sent_at: float
    reveal: Reveal | None = None
    revealed_at: float | None = None
    refused: list[str] = field(default_factory=list)


class SiteSession:
    """One site's secure-aggregation state for one run.

    Parameters
    ----------
    site_id : str
        This site's enrolled id.
    identity : SiteIdentity
        This site's long-term signing key.
    config : SecAggConfig
        The run's settings (identical at every site and the server).
    run_id : str
        The run; binds every key, mask and signature.
    directory : Mapping[str, bytes]
        Enrolled identity public keys of all sites (pinned at the site, not taken
        from the server: it is what makes key substitution detectable).
    exchange_key : X25519PrivateKey, optional
        The run's X25519 key; leave it out (a fresh one is generated). Tests pass a
        fixed key to be reproducible. Never reuse one across runs.
    """

    def __init__(
        self,
        site_id: str,
        identity: SiteIdentity,
        config: SecAggConfig,
        run_id: str,
        *,
        directory: Mapping[str, bytes],
        exchange_key: X25519PrivateKey | None = None,
    ) -> None:
        self.site_id = site_id
        self.identity = identity
        self.config = config
        self.run_id = run_id
        self.directory = check_directory(directory)
        if directory.get(site_id) != identity.public_bytes:
            raise RosterError(
                "this site's identity key differs from its enrolled one",
                where=f"site {site_id!r}",
                fix="re-enrol the site identity",
            )
        # fresh per run; leaves this object only via to_state (owner-only file, deleted at run end)
        self._key = exchange_key if exchange_key is not None else X25519PrivateKey.generate()
        self._public = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self._pairs: dict[str, bytes] = {}
        self._roster: Roster | None = None
        self._order: tuple[str, ...] = ()
        self._fp: FixedPoint | None = None
        self._threshold = 0
        self._last_round = 0
        self._rounds: dict[int, _SiteRound] = {}

    # ---- setup (once per run)
    def pin_directory(self, directory: Mapping[str, bytes]) -> None:
        """Adopt the identity keys of all sites, before the roster (once per run).

        For a site that learns its peers only when a run starts: it advertises
        first, then receives the directory with the roster. The directory must
        carry this site's own key unchanged.
        """
        checked = check_directory(directory)
        if checked.get(self.site_id) != self.identity.public_bytes:
            raise RosterError(
                "the directory carries another identity key for this site",
                where=f"site {self.site_id!r}",
                fix="stop the run: the relay substituted this site's identity",
            )
        if self._order:
            raise RosterError(
                "the directory arrived after the roster", where=f"site {self.site_id!r}"
            )
        self.directory = checked

    def advertise(self) -> KeyAdvert:
        """Sign and return the per-run X25519 public key (one short message)."""
        advert = KeyAdvert(self.site_id, self.run_id, self._public)
        return KeyAdvert(
            advert.site_id,
            advert.run_id,
            advert.public_key,
            self.identity.sign(advert.signed_payload()),
        )

    def accept_roster(self, roster: Roster) -> None:
        """Verify every advert and derive one pair secret per peer (X25519 + HKDF)."""
        verify_roster(roster, self.run_id, self.directory)
        mine = [a for a in roster.adverts if a.site_id == self.site_id]
        if not mine or mine[0].public_key != self._public:
            raise RosterError(
                "the roster does not carry this site's own key advert",
                where=f"site {self.site_id!r}",
                fix="the relay substituted this site's key: stop the run",
            )
        if self._order and roster.site_ids != self._order:
            raise RosterError(
                "a second, different roster for the same run", where=f"site {self.site_id!r}"
            )
        n = len(roster.adverts)
        self._threshold = self.config.resolved_threshold(n)
        self._fp = FixedPoint.of(self.config, n)
        pairs = {}
        for advert in roster.adverts:
            if advert.site_id == self.site_id:
                continue
            try:
                shared = self._key.exchange(X25519PublicKey.from_public_bytes(advert.public_key))
            except ValueError:
                raise RosterError(
                    "a peer's X25519 key is invalid (low order)", where=f"site {advert.site_id!r}"
                ) from None
            pairs[advert.site_id] = prg.pair_secret(
                shared, self.run_id, self.site_id, self._public, advert.site_id, advert.public_key
            )
        self._pairs = pairs
        self._roster = roster
        self._order = roster.site_ids

    @property
    def has_roster(self) -> bool:
        """True once the run's roster is accepted (pair secrets derived)."""
        return self._roster is not None

    # ---- resume after a site daemon restart
    def to_state(self) -> dict[str, Any]:
        """JSON-ready state to resume this run: holds the run's SECRET X25519 key.

        Only what re-derives the pair secrets (key, directory, roster) and the last
        masked round, so a resumed session still never masks a round twice. Per-round
        reveal records are not kept: a resumed session refuses to reveal for rounds
        masked before it (it cannot know what it already answered).
        """
        return {
            "site": self.site_id,
            "run": self.run_id,
            "config": self.config.to_dict(),
            "exchange_key": self._key.private_bytes(
                serialization.Encoding.Raw,
                serialization.PrivateFormat.Raw,
                serialization.NoEncryption(),
            ).hex(),
            "directory": {s: k.hex() for s, k in self.directory.items()},
            "roster": None if self._roster is None else self._roster.to_bytes().hex(),
            "last_round": self._last_round,
        }

    @classmethod
    def from_state(cls, identity: SiteIdentity, state: Mapping[str, Any]) -> SiteSession:
        """Rebuild a session from :meth:`to_state` (the roster is verified again)."""
        session = cls(
            str(state["site"]),
            identity,
            SecAggConfig.from_dict(state["config"]),
            str(state["run"]),
            directory={s: bytes.fromhex(k) for s, k in state["directory"].items()},
            exchange_key=X25519PrivateKey.from_private_bytes(bytes.fromhex(state["exchange_key"])),
        )
        if state["roster"] is not None:
            session.accept_roster(Roster.from_bytes(bytes.fromhex(state["roster"])))
        session._last_round = int(state["last_round"])
        return session

    @property
    def threshold(self) -> int:
        """The resolved threshold ``t`` (after the roster)."""
        return self._threshold

    def _position(self, site: str) -> int:
        return self._order.index(site) + 1  # Shamir x-coordinate

    def _check_participants(self, participants: Iterable[str] | None) -> tuple[str, ...]:
        if not self._order:
            raise ProtocolError(
                "secure aggregation has no roster yet",
                fix="call accept_roster with round 1's roster first",
            )
        parts = _canonical(self._order if participants is None else participants)
        unknown = set(parts) - set(self._order)
        if unknown:
            raise ProtocolError(f"round participants {sorted(unknown)} are not in the roster")
        if self.site_id not in parts:
            raise ProtocolError("this site is not among the round's participants")
        if len(parts) < self._threshold + 1:
            raise ProtocolError(
                f"only {len(parts)} participants; masking needs at least {self._threshold + 1}",
                expected="threshold + 1 participants (a sum of fewer reveals too much)",
            )
        return parts

    # ---- every round
    def mask_update(
        self,
        server_round: int,
        vector: np.ndarray,
        weight: float,
        *,
        participants: Iterable[str] | None = None,
        deadline: float | None = None,
        now: float | None = None,
        rng: np.random.Generator | None = None,
    ) -> MaskedUpdate:
        """Quantize, weight, mask and sign this round's update (the round's one message).

        Refuses a round it already masked or an older one (a mask is never reused),
        and refuses after ``deadline`` (epoch seconds): a late update could be
        unmasked with the seeds survivors revealed for this site.
        """
        parts = self._check_participants(participants)
        assert self._fp is not None
        if server_round <= self._last_round:
            raise ProtocolError(
                f"round {server_round} is not after round {self._last_round}, already masked",
                expected="a strictly increasing round number; each round is masked once",
            )
        clock = time.time() if now is None else now
        if deadline is not None and clock > deadline:
            raise LateUpdateError(
                self.site_id,
                f"round {server_round}'s deadline has passed",
                fix="the round is lost for this site; wait for the next one",
            )
        out, clipped = encode(vector, weight, self._fp, rounding=self.config.rounding, rng=rng)
        terms = [
            (
                prg.round_mask_seed(self._pairs[p], self.run_id, server_round, self.site_id, p),
                prg.mask_sign(self.site_id, p),
            )
            for p in parts
            if p != self.site_id
        ]
        shares: dict[str, bytes] = {}
        if self.config.mode == "strict":
            seed = secrets.token_bytes(prg.SEED_BYTES)
            terms.append((prg.self_mask_key(seed, self.run_id, server_round, self.site_id), 1))
            others = [p for p in parts if p != self.site_id]
            dealt = shamir.split(seed, self._threshold, [self._position(p) for p in others])
            for p in others:
                key = prg.share_key(self._pairs[p], self.run_id, server_round, self.site_id, p)
                aad = prg.frame("share", self.run_id, server_round, self.site_id, p)
                shares[p] = ChaCha20Poly1305(key).encrypt(
                    _AEAD_NONCE, dealt[self._position(p)], aad
                )
            del seed, dealt
        prg.apply_masks(out, terms)
        digest = vector_digest(out)
        unsigned = MaskedUpdate(
            self.run_id,
            server_round,
            self.site_id,
            self._fp.modulus_bits,
            parts,
            int(out.size),
            out,
            shares,
            digest,
        )
        update = MaskedUpdate(
            self.run_id,
            server_round,
            self.site_id,
            self._fp.modulus_bits,
            parts,
            int(out.size),
            out,
            shares,
            digest,
            self.identity.sign(unsigned.signed_payload()),
        )
        self._last_round = server_round
        self._rounds[server_round] = _SiteRound(
            parts, digest, out.nbytes, float(weight), clipped, clock
        )
        return update

    def reveal(self, request: UnmaskRequest, *, now: float | None = None) -> Reveal:
        """Answer an unmask request for a round this site masked (at most one answer).

        Default mode: the round's mask seeds with each dropped site (never the pair
        secret). Strict mode: also the self-mask shares of the other survivors.
        A site reveals, per peer and round, either a seed (peer dropped) or a share
        (peer survived), never both; a repeated request must name the same sets.
        """
        rec = self._rounds.get(request.server_round)
        where = f"site {self.site_id!r}, round {request.server_round}"
        if request.run_id != self.run_id or request.site_id != self.site_id:
            raise ProtocolError("unmask request for another run or site", where=where)
        if rec is None:
            raise ProtocolError(
                "this site sent no update that round; nothing to reveal", where=where
            )
        survivors, dropped = _canonical(request.survivors), _canonical(request.dropped)
        if rec.reveal is not None:
            if (rec.reveal.survivors, rec.reveal.dropped) == (survivors, dropped):
                return rec.reveal
            rec.refused.append(
                f"second unmask request with survivors={list(survivors)} dropped={list(dropped)}"
            )
            raise ProtocolError(
                "the server changed its account of who dropped out this round",
                where=where,
                expected=f"survivors {list(rec.reveal.survivors)}, "
                f"dropped {list(rec.reveal.dropped)} (as first announced)",
                fix="keep this site's audit record; the server is misbehaving",
            )
        if set(survivors) & set(dropped) or set(survivors) | set(dropped) != set(rec.participants):
            raise ProtocolError(
                "survivors and dropped sites do not partition the participants",
                where=where,
                expected=str(list(rec.participants)),
            )
        if self.site_id not in survivors:
            raise ProtocolError(
                "the server lists this site as dropped, but it sent its update",
                where=where,
                fix="keep this site's audit record",
            )
        if len(survivors) < self._threshold + 1:
            raise ProtocolError(
                f"only {len(survivors)} survivors; unmasking needs {self._threshold + 1}",
                where=where,
                expected="threshold + 1 survivors: fewer would expose an update",
            )
        if self.config.mode == "default" and not dropped:
            raise ProtocolError("no site dropped: default mode needs no reveal", where=where)
        relayed_from_dropped = sorted(set(request.shares) & set(dropped))
        if relayed_from_dropped:
            raise ProtocolError(
                f"the server relays shares from {relayed_from_dropped}, which it says dropped: "
                "it received their updates",
                where=where,
                fix="keep this site's audit record",
            )
        seeds = {
            j: prg.round_mask_seed(
                self._pairs[j], self.run_id, request.server_round, self.site_id, j
            )
            for j in dropped
        }
        b_shares: dict[str, bytes] = {}
        if self.config.mode == "strict":
            for i in survivors:
                if i == self.site_id or i not in request.shares:
                    continue
                key = prg.share_key(
                    self._pairs[i], self.run_id, request.server_round, i, self.site_id
                )
                aad = prg.frame("share", self.run_id, request.server_round, i, self.site_id)
                try:
                    b_shares[i] = ChaCha20Poly1305(key).decrypt(_AEAD_NONCE, request.shares[i], aad)
                except InvalidTag:
                    raise ProtocolError(
                        "a relayed self-mask share does not decrypt",
                        where=f"{where}, share from site {i!r}",
                    ) from None
        unsigned = Reveal(
            self.run_id, request.server_round, self.site_id, survivors, dropped, seeds, b_shares
        )
        reveal = Reveal(
            self.run_id,
            request.server_round,
            self.site_id,
            survivors,
            dropped,
            seeds,
            b_shares,
            self.identity.sign(unsigned.signed_payload()),
        )
        rec.reveal = reveal
        rec.revealed_at = time.time() if now is None else now
        return reveal

    def audit_entry(self, server_round: int) -> dict[str, Any]:
        """JSON-ready audit record of what left this site for ``server_round``.

        Write it BEFORE sending the update, and again (it then names the reveal)
        before sending a reveal: comparing sites' records exposes a server that
        declared a site dropped after receiving its update.
        """
        rec = self._rounds.get(server_round)
        if rec is None:
            raise ProtocolError(
                f"no secure-aggregation record for round {server_round}",
                where=f"site {self.site_id!r}",
            )
        entry: dict[str, Any] = {
            "protection": f"secure-aggregation/{self.config.mode}",
            "run": self.run_id,
            "round": server_round,
            "site": self.site_id,
            "participants": list(rec.participants),
            "modulus_bits": self.config.modulus_bits,
            "update_digest": f"{DIGEST}:{rec.digest.hex()}",
            "update_bytes": rec.n_bytes,
            "weight": rec.weight,
            "clipped_coordinates": rec.clipped,
            "sent_at": rec.sent_at,
            "reveal": None,
            "refused": list(rec.refused),
        }
        if rec.reveal is not None:
            entry["reveal"] = {
                "at": rec.revealed_at,
                "server_declared_dropped": list(rec.reveal.dropped),
                "server_declared_survivors": list(rec.reveal.survivors),
                "mask_seeds_revealed_with": sorted(rec.reveal.seeds),
                "self_mask_shares_revealed_for": sorted(rec.reveal.b_shares),
                "signature": rec.reveal.signature.hex(),
            }
        return entry
