"""Server side of secure aggregation: a per-round state machine that only ever holds sums.

Per round: ``begin_round`` -> ``add`` (each masked update is verified, then added
mod ``2**k`` into one accumulator and dropped) -> ``close_collection`` (after the
deadline, or as soon as every participant sent) -> optionally ``add_reveal`` ->
``result``. Once collection closes, every update for that round is refused
(``LateUpdateError``): survivors may have revealed their seeds with a late site.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from medfed.core import bulk_hash
from medfed.core.secagg import prg, shamir
from medfed.core.secagg.config import FixedPoint, SecAggConfig
from medfed.core.secagg.errors import (
    LateUpdateError,
    MalformedMessageError,
    ProtocolError,
    RecoveryError,
    ReplayedUpdateError,
    TamperedUpdateError,
    TruncatedUpdateError,
    UnknownSiteError,
)
from medfed.core.secagg.identity import SiteIdentity, check_directory
from medfed.core.secagg.messages import MaskedUpdate, Reveal, Roster, UnmaskRequest
from medfed.core.secagg.quantize import decode_sum, error_bound
from medfed.core.secagg.site import _canonical, verify_roster


@dataclass(frozen=True)
class RoundStatus:
    """What ``close_collection`` decided: who survived, who dropped, what to send next.

    ``unmask`` maps each survivor to the request it must answer; it is empty when
    the round needs no extra message (default mode, nobody dropped).
    """

    server_round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    unmask: Mapping[str, UnmaskRequest]

    @property
    def needs_unmasking(self) -> bool:
        """True when survivors must answer one more message before ``result``."""
        return bool(self.unmask)


@dataclass
class _Round:
    number: int
    participants: tuple[str, ...]
    acc: np.ndarray | None
    received: dict[str, bytes] = field(default_factory=dict)  # site -> payload digest
    shares: dict[str, Mapping[str, bytes]] = field(default_factory=dict)  # sender -> {rcv: ct}
    status: RoundStatus | None = None
    reveals: dict[str, Reveal] = field(default_factory=dict)
    result: tuple[np.ndarray, float] | None = None
    broken: bool = False  # an add failed part-way: the sum holds part of a vector


class Aggregator:
    """Server-side secure aggregation for one run.

    Parameters
    ----------
    config : SecAggConfig
        The run's settings.
    run_id : str
        The run id every message must carry.
    roster : Roster
        The key adverts relayed to the sites (verified here too).
    directory : Mapping[str, bytes]
        Enrolled identity public keys (site id -> 32-byte Ed25519 key).
    size : int
        Length ``d`` of the model's flat update vector.
    """

    def __init__(
        self,
        config: SecAggConfig,
        run_id: str,
        roster: Roster,
        *,
        directory: Mapping[str, bytes],
        size: int,
    ) -> None:
        self.config = config
        self.run_id = run_id
        self.directory = check_directory(directory)
        verify_roster(roster, run_id, self.directory)
        self.roster = roster
        self.sites = roster.site_ids
        self.threshold = config.resolved_threshold(len(self.sites))
        self.fp = FixedPoint.of(config, len(self.sites))
        self.size = int(size)
        self._publics = {a.site_id: a.public_key for a in roster.adverts}
        self._round: _Round | None = None
        self._history: dict[int, tuple[str, ...]] = {}  # closed round -> dropped sites

    # ---- collection
    def begin_round(self, server_round: int, *, participants: Iterable[str] | None = None) -> None:
        """Open ``server_round`` (after the last one) for ``participants`` (default: all)."""
        if self._round is not None and server_round <= self._round.number:
            raise ProtocolError(f"round {server_round} is not after round {self._round.number}")
        parts = _canonical(self.sites if participants is None else participants)
        if set(parts) - set(self.sites):
            raise ProtocolError(
                f"participants {sorted(set(parts) - set(self.sites))} are not in the roster"
            )
        if len(parts) < self.threshold + 1:
            raise ProtocolError(
                f"{len(parts)} participants in round {server_round}; at least "
                f"{self.threshold + 1} are needed (threshold {self.threshold} + 1)",
                fix="sample more sites per round, or set the run's secagg_threshold "
                f"(--secagg-threshold) to at most {len(parts) - 1}",
            )
        if self._round is not None and self._round.status is not None:
            self._history[self._round.number] = self._round.status.dropped
        self._round = _Round(server_round, parts, np.zeros(self.size + 1, dtype=self.fp.dtype))

    def _current(self, server_round: int) -> _Round:
        rnd = self._round
        if rnd is None or rnd.number != server_round:
            raise ProtocolError(f"round {server_round} is not the open round")
        return rnd

    def add(self, update: MaskedUpdate) -> None:
        """Verify ``update`` and fold it into the round's sum; rejections name the site.

        Raises a subclass of :class:`UpdateRejected`: unknown site, truncated payload,
        bad signature (tampered), another run or round or a second update (replayed),
        or an update after collection closed (late).
        """
        site = update.site_id
        if site not in self._publics:
            raise UnknownSiteError(site, "the sender is not in this run's roster")
        if update.modulus_bits != self.fp.modulus_bits or update.vector.dtype != self.fp.dtype:
            raise MalformedMessageError(
                site, f"{update.modulus_bits}-bit update, the run uses {self.fp.modulus_bits} bits"
            )
        if update.vector.size != update.length or update.length != self.size + 1:
            raise TruncatedUpdateError(
                site,
                f"payload has {update.vector.size} values, header says {update.length}",
                expected=f"{self.size + 1} values (model size + 1 weight coordinate)",
            )
        # the signed header first (cheap); the vector's bytes are checked against its
        # digest while they are added, below
        if not SiteIdentity.verify(self.directory[site], update.signature, update.signed_payload()):
            raise _tampered(site)
        rnd = self._round
        if update.run_id != self.run_id:
            raise ReplayedUpdateError(
                site, f"update for run {update.run_id!r}", expected=f"run {self.run_id!r}"
            )
        if rnd is None or update.server_round > rnd.number:
            raise ReplayedUpdateError(
                site, f"update for round {update.server_round}, which is not open"
            )
        if update.server_round < rnd.number:
            if site in self._history.get(update.server_round, ()):
                raise LateUpdateError(
                    site,
                    f"round {update.server_round} closed and this site "
                    "was declared dropped; its update is refused",
                )
            raise ReplayedUpdateError(
                site, f"update for past round {update.server_round}", expected=f"round {rnd.number}"
            )
        if rnd.status is not None:
            raise LateUpdateError(
                site,
                f"round {rnd.number}'s collection closed "
                f"(dropped: {list(rnd.status.dropped)}); the update is refused",
            )
        if site in rnd.received:
            raise ReplayedUpdateError(site, f"a second update for round {rnd.number}")
        if site not in rnd.participants or update.participants != rnd.participants:
            raise MalformedMessageError(
                site,
                "the update's participant list differs from the round's",
                expected=str(list(rnd.participants)),
            )
        if self.config.mode == "strict":
            others = set(rnd.participants) - {site}
            if set(update.shares) != others:
                raise MalformedMessageError(
                    site,
                    "strict mode needs one self-mask share per other participant",
                    expected=str(sorted(others)),
                )
        self._fold(rnd, site, update)
        if self.config.mode == "strict":
            rnd.shares[site] = dict(update.shares)
        rnd.received[site] = update.digest

    def _fold(self, rnd: _Round, site: str, update: MaskedUpdate) -> None:
        """Add the vector mod 2**k while hashing it; take it back out if the digest differs."""
        _check_whole(rnd)
        assert rnd.acc is not None
        try:
            digest = bulk_hash.add_and_digest(rnd.acc, update.vector)
        except BaseException:
            rnd.broken = True  # fail the round closed: never decode a partial sum
            raise
        if digest != update.digest:
            np.subtract(rnd.acc, update.vector, out=rnd.acc)  # exact: the same words mod 2**k
            raise _tampered(site)

    def close_collection(self, server_round: int, *, deadline_passed: bool) -> RoundStatus:
        """End collection; participants without an update are declared dropped.

        Dropouts are declared only when ``deadline_passed`` (deadline plus margin);
        before that, closing is allowed only once every participant has sent.
        """
        rnd = self._current(server_round)
        if rnd.status is not None:
            return rnd.status
        _check_whole(rnd)  # no survivor is asked to reveal anything for a lost sum
        survivors = _canonical(rnd.received)
        dropped = _canonical(set(rnd.participants) - set(rnd.received))
        if dropped and not deadline_passed:
            raise ProtocolError(
                f"{list(dropped)} have not sent yet; a dropout is declared only after the "
                "round deadline plus its margin",
                fix="wait for the deadline, then close",
            )
        unmask: dict[str, UnmaskRequest] = {}
        if dropped or self.config.mode == "strict":
            for k in survivors:
                relayed = {i: rnd.shares[i][k] for i in survivors if i != k and i in rnd.shares}
                unmask[k] = UnmaskRequest(self.run_id, server_round, k, survivors, dropped, relayed)
        rnd.status = RoundStatus(server_round, survivors, dropped, unmask)
        rnd.shares.clear()  # relayed once; the server keeps no ciphertexts
        if len(survivors) < self.threshold + 1:
            rnd.acc = None
            raise RecoveryError(
                f"round {server_round}: {len(survivors)} survivors, at least "
                f"{self.threshold + 1} needed (threshold {self.threshold} + 1); the round is lost",
                where=f"dropped: {list(dropped)}",
                fix="rerun the round",
            )
        return rnd.status

    # ---- unmasking
    def add_reveal(self, reveal: Reveal) -> None:
        """Verify a survivor's reveal for the closed round and keep it."""
        site = reveal.site_id
        if site not in self._publics:
            raise UnknownSiteError(site, "reveal from a site not in the roster")
        if not SiteIdentity.verify(self.directory[site], reveal.signature, reveal.signed_payload()):
            raise TamperedUpdateError(site, "the reveal's signature does not verify")
        rnd = self._round
        if reveal.run_id != self.run_id or rnd is None or reveal.server_round != rnd.number:
            raise ReplayedUpdateError(
                site,
                f"reveal for run {reveal.run_id!r} round {reveal.server_round}, which is not open",
            )
        if rnd.status is None or not rnd.status.unmask:
            raise ProtocolError(f"round {rnd.number} asked for no reveal", where=f"site {site!r}")
        if site not in rnd.status.survivors:
            raise MalformedMessageError(site, "reveal from a site that is not a survivor")
        if (reveal.survivors, reveal.dropped) != (rnd.status.survivors, rnd.status.dropped):
            raise MalformedMessageError(site, "the reveal answers a different dropout set")
        if site in rnd.reveals:
            raise ReplayedUpdateError(site, f"a second reveal for round {rnd.number}")
        if set(reveal.seeds) != set(rnd.status.dropped):
            raise MalformedMessageError(
                site,
                "the reveal lacks a seed for a dropped site",
                expected=str(list(rnd.status.dropped)),
            )
        rnd.reveals[site] = reveal

    def result(self, server_round: int) -> tuple[np.ndarray, float]:
        """The survivors' weighted mean (float32, length ``d``) and their total weight."""
        rnd = self._current(server_round)
        if rnd.result is not None:
            return rnd.result
        status = rnd.status
        if status is None:
            raise ProtocolError(
                f"round {server_round}'s collection is still open",
                fix="call close_collection first",
            )
        if rnd.acc is None:
            raise RecoveryError(f"round {server_round} was lost (too few survivors)")
        terms: list[tuple[bytes, int]] = []
        if status.dropped:
            missing = [k for k in status.survivors if k not in rnd.reveals]
            if missing:
                raise RecoveryError(
                    f"round {server_round}: no reveal yet from {missing}; their masks with the "
                    f"dropped sites {list(status.dropped)} cannot be removed",
                    fix="wait for their reveals; if they are gone, the round is lost",
                )
            for k in status.survivors:
                for j, seed in rnd.reveals[k].seeds.items():
                    terms.append((seed, -prg.mask_sign(k, j)))
        if self.config.mode == "strict":
            for i in status.survivors:
                held = {k: r.b_shares[i] for k, r in rnd.reveals.items() if i in r.b_shares}
                seed = shamir.combine(
                    held, self.threshold, prg.SEED_BYTES, what=f"site {i!r}'s self-mask seed"
                )
                terms.append((prg.self_mask_key(seed, self.run_id, server_round, i), -1))
        prg.apply_masks(rnd.acc, terms)
        rnd.result = decode_sum(rnd.acc, self.fp)
        rnd.acc = None
        return rnd.result

    def error_bound(self, server_round: int) -> float:
        """The documented per-coordinate error bound of this round's result."""
        rnd = self._current(server_round)
        if rnd.result is None or rnd.status is None:
            raise ProtocolError("no result yet")
        return error_bound(self.fp, len(rnd.status.survivors), rnd.result[1], self.config.rounding)


def _check_whole(rnd: _Round) -> None:
    if rnd.broken:
        raise RecoveryError(
            f"round {rnd.number}'s sum was lost: adding an update failed part-way",
            fix="the round ends without a new model; the server log names the error that "
            "interrupted the add",
        )


def _tampered(site: str) -> TamperedUpdateError:
    return TamperedUpdateError(
        site,
        "the signature does not match the update received",
        fix="the message was altered in transit; check the relay",
    )
