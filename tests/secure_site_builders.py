"""Builders for tests of the site glue (SecureSite): sites in folders, one server aggregator."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medfed.client.secure_site import SecureSite
from medfed.core import wire
from medfed.core.schema import SiteInstruction
from medfed.core.secagg import (
    Aggregator,
    KeyAdvert,
    MaskedUpdate,
    Reveal,
    Roster,
    SecAggConfig,
)

RUN = "17"


@dataclass
class SiteFederation:
    """SecureSites (each with its own folder), the run's roster, directory and aggregator."""

    config: SecAggConfig
    folders: dict[str, Path]
    sites: dict[str, SecureSite]
    roster: Roster
    directory: dict[str, bytes]
    aggregator: Aggregator

    def restart(self, site: str) -> SecureSite:
        """A fresh SecureSite on the same folder: what a daemon restart leaves."""
        self.sites[site] = SecureSite(site, self.folders[site])
        return self.sites[site]


def joined(
    root: Path, n: int = 4, *, size: int = 64, run_id: str = RUN, **config: Any
) -> SiteFederation:
    """``n`` sites join ``run_id`` as the server's join query makes them do."""
    cfg = SecAggConfig(**config)
    ids = [f"site-{chr(ord('a') + i)}" for i in range(n)]
    folders = {s: root / s for s in ids}
    sites = {s: SecureSite(s, folders[s]) for s in ids}
    adverts, directory = [], {}
    for s in ids:
        out = sites[s].join(run_id, json.dumps(cfg.to_dict()))
        adverts.append(KeyAdvert.from_bytes(out.need("advert")))
        directory[s] = out.need("identity")
    roster = Roster.of(run_id, adverts)
    return SiteFederation(
        cfg,
        folders,
        sites,
        roster,
        directory,
        Aggregator(cfg, run_id, roster, directory=directory, size=size),
    )


def train_message(
    fed: SiteFederation, participants: list[str], directory: dict[str, bytes] | None = None
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The secure-aggregation part of a train message: (config, blobs)."""
    config = {
        wire.SECAGG_DIRECTORY: json.dumps(
            {s: k.hex() for s, k in (directory or fed.directory).items()}
        ),
        wire.SECAGG_PARTICIPANTS: json.dumps(sorted(participants)),
        wire.SECAGG_DEADLINE: time.time() + 600,
    }
    return config, {wire.SECAGG_ROSTER: fed.roster.to_bytes()}


def mask(
    fed: SiteFederation,
    site: str,
    rnd: int,
    x: np.ndarray,
    w: float,
    participants: list[str],
    run_id: str = RUN,
) -> MaskedUpdate:
    """One site masks ``x`` (local - global with a zero global model) for round ``rnd``."""
    config, blobs = train_message(fed, participants)
    header, vector, _ = fed.sites[site].mask(
        run_id,
        rnd,
        SiteInstruction.read(config, blobs),
        global_vec=np.zeros_like(x),
        local_vec=x,
        weight=w,
    )
    return MaskedUpdate.from_parts(header, vector.copy())


def secure_round(
    fed: SiteFederation,
    rnd: int,
    xs: dict[str, np.ndarray],
    ws: dict[str, float],
    senders: list[str],
) -> tuple[np.ndarray, float]:
    """A whole round through the sites' SecureSite and the server's Aggregator."""
    agg = fed.aggregator
    participants = sorted(fed.sites)
    agg.begin_round(rnd, participants=participants)
    for s in senders:
        agg.add(mask(fed, s, rnd, xs[s], ws[s], participants))
    status = agg.close_collection(rnd, deadline_passed=True)
    for s, request in status.unmask.items():
        reveal, _ = fed.sites[s].reveal(RUN, request.to_bytes())
        agg.add_reveal(Reveal.from_bytes(reveal))
    return agg.result(rnd)
