"""Small builders for the secure-aggregation tests: a seeded federation in one process."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from medfed.core.secagg import (
    Aggregator,
    MaskedUpdate,
    Reveal,
    Roster,
    SecAggConfig,
    SiteIdentity,
    SiteSession,
    UnmaskRequest,
)

RUN = "run-0001"


@dataclass
class Federation:
    """Sites, their sessions, the roster and the server's aggregator."""

    config: SecAggConfig
    ids: list[str]
    identities: dict[str, SiteIdentity]
    directory: dict[str, bytes]
    sessions: dict[str, SiteSession]
    roster: Roster
    aggregator: Aggregator


def _key(seed: int, tag: int) -> bytes:
    return np.random.default_rng([seed, tag]).bytes(32)


def federation(
    n: int = 4, *, size: int = 257, seed: int = 0, run_id: str = RUN, **config: object
) -> Federation:
    """``n`` sites (``site-a``, ``site-b``, ...) with seeded keys, roster accepted."""
    cfg = SecAggConfig(**config)  # type: ignore[arg-type]
    ids = [f"site-{chr(ord('a') + i)}" for i in range(n)]
    identities = {s: SiteIdentity.from_private_bytes(_key(seed, 2 * i)) for i, s in enumerate(ids)}
    directory = {s: identities[s].public_bytes for s in ids}
    sessions = {
        s: SiteSession(
            s,
            identities[s],
            cfg,
            run_id,
            directory=directory,
            exchange_key=X25519PrivateKey.from_private_bytes(_key(seed, 2 * i + 1)),
        )
        for i, s in enumerate(ids)
    }
    # adverts travel as bytes, the roster too (what Flower carries)
    adverts = [
        type(sessions[s].advertise()).from_bytes(sessions[s].advertise().to_bytes()) for s in ids
    ]
    roster = Roster.from_bytes(Roster.of(run_id, adverts).to_bytes())
    for s in ids:
        sessions[s].accept_roster(roster)
    aggregator = Aggregator(cfg, run_id, roster, directory=directory, size=size)
    return Federation(cfg, ids, identities, directory, sessions, roster, aggregator)


def updates(
    fed: Federation, size: int, *, seed: int = 1, scale: float = 1.0
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Seeded float32 updates in [-scale, scale] and integer example counts."""
    rng = np.random.default_rng(seed)
    xs = {s: rng.uniform(-scale, scale, size).astype(np.float32) for s in fed.ids}
    ws = {s: float(rng.integers(1, 5000)) for s in fed.ids}
    return xs, ws


def wire(update: MaskedUpdate) -> MaskedUpdate:
    """The update after a trip through (header bytes, array), as in Flower records."""
    header, vector = update.to_parts()
    return MaskedUpdate.from_parts(header, vector.copy())


def run_round(
    fed: Federation,
    rnd: int,
    xs: dict[str, np.ndarray],
    ws: dict[str, float],
    senders: Iterable[str] | None = None,
) -> tuple[np.ndarray, float]:
    """One full round where only ``senders`` (default all) send; returns the result."""
    senders = list(fed.ids if senders is None else senders)
    agg = fed.aggregator
    agg.begin_round(rnd)
    for s in senders:
        agg.add(wire(fed.sessions[s].mask_update(rnd, xs[s], ws[s])))
    status = agg.close_collection(rnd, deadline_passed=True)
    for k, request in status.unmask.items():
        reveal = fed.sessions[k].reveal(UnmaskRequest.from_bytes(request.to_bytes()))
        agg.add_reveal(Reveal.from_bytes(reveal.to_bytes()))
    return agg.result(rnd)


def weighted_mean(
    xs: dict[str, np.ndarray], ws: dict[str, float], sites: Iterable[str], clip: float = 1.0
) -> np.ndarray:
    """The plaintext reference, in float64."""
    sites = list(sites)
    num = sum(ws[s] * np.clip(xs[s].astype(np.float64), -clip, clip) for s in sites)
    return num / sum(ws[s] for s in sites)
