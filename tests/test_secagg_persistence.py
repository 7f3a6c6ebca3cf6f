"""A site daemon restart mid-run: the run's session comes back from disk, safely."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import numpy as np
import pytest
from secagg_builders import weighted_mean
from secure_site_builders import RUN, joined, mask, secure_round

from medfed.client.secagg_sessions import SESSIONS_DIR
from medfed.client.secure_site import BelowSiteMinimum, SecureSite
from medfed.core.errors import MedfedError
from medfed.core.secagg import ProtocolError

D = 64


def _updates(ids: list[str], seed: int) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    rng = np.random.default_rng(seed)
    return (
        {s: rng.uniform(-1, 1, D).astype(np.float32) for s in ids},
        {s: float(rng.integers(1, 500)) for s in ids},
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_restarted_site_masks_round_2_and_the_sum_is_right(tmp_path: Path) -> None:
    fed = joined(tmp_path, 4, size=D, threshold=2)
    ids = sorted(fed.sites)
    xs, ws = _updates(ids, 1)
    mean, _ = secure_round(fed, 1, xs, ws, ids)
    assert np.abs(mean - weighted_mean(xs, ws, ids)).max() <= fed.aggregator.error_bound(1)

    fed.restart("site-b")  # its in-memory session is gone; the file holds it
    xs2, ws2 = _updates(ids, 2)
    mean2, total2 = secure_round(fed, 2, xs2, ws2, ids)
    assert total2 == sum(ws2.values())
    assert np.abs(mean2 - weighted_mean(xs2, ws2, ids)).max() <= fed.aggregator.error_bound(2)


def test_restarted_site_reveals_for_a_dropout_after_the_restart(tmp_path: Path) -> None:
    fed = joined(tmp_path, 4, size=D, threshold=2)
    ids = sorted(fed.sites)
    xs, ws = _updates(ids, 3)
    secure_round(fed, 1, xs, ws, ids)
    fed.restart("site-a")
    fed.restart("site-b")
    survivors = ["site-a", "site-b", "site-d"]  # site-c drops: the survivors reveal its seeds
    mean, total = secure_round(fed, 2, xs, ws, survivors)
    assert total == sum(ws[s] for s in survivors)
    assert np.abs(mean - weighted_mean(xs, ws, survivors)).max() <= fed.aggregator.error_bound(2)


def test_restart_before_round_1_keeps_the_joined_key(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    ids = sorted(fed.sites)
    fed.restart("site-c")  # between the join query and round 1: roster not yet seen
    xs, ws = _updates(ids, 4)
    mean, _ = secure_round(fed, 1, xs, ws, ids)
    assert np.abs(mean - weighted_mean(xs, ws, ids)).max() <= fed.aggregator.error_bound(1)


def test_same_round_is_never_masked_twice_across_a_restart(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    ids = sorted(fed.sites)
    xs, ws = _updates(ids, 5)
    mask(fed, "site-a", 1, xs["site-a"], ws["site-a"], ids)
    fed.restart("site-a")
    with pytest.raises(ProtocolError, match="DIFFERENT update") as err:
        mask(fed, "site-a", 1, xs["site-a"] + 0.5, ws["site-a"], ids)
    assert "reveal" in str(err.value) and "round 1" in str(err.value)
    with pytest.raises(ProtocolError, match="already masked and sent with this update"):
        mask(fed, "site-a", 1, xs["site-a"], ws["site-a"], ids)
    mask(fed, "site-b", 1, xs["site-b"], ws["site-b"], ids)
    with pytest.raises(ProtocolError, match="DIFFERENT update"):  # and without a restart
        mask(fed, "site-b", 1, xs["site-b"] * 0, ws["site-b"], ids)
    assert mask(fed, "site-a", 2, xs["site-a"], ws["site-a"], ids).server_round == 2


def test_no_reveal_for_a_round_masked_before_the_restart(tmp_path: Path) -> None:
    fed = joined(tmp_path, 4, size=D, threshold=2)
    ids = sorted(fed.sites)
    xs, ws = _updates(ids, 6)
    agg = fed.aggregator
    agg.begin_round(1, participants=ids)
    for s in ids[:3]:  # site-d drops
        agg.add(mask(fed, s, 1, xs[s], ws[s], ids))
    status = agg.close_collection(1, deadline_passed=True)
    fed.restart("site-a")
    with pytest.raises(ProtocolError, match="before the site daemon restarted"):
        fed.sites["site-a"].reveal(RUN, status.unmask["site-a"].to_bytes())


def test_end_run_deletes_the_secrets(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    site = fed.sites["site-a"]
    path = site.store.path(RUN)
    assert path.is_file()
    site.end_run(RUN)
    assert not path.exists()
    with pytest.raises(MedfedError, match="holds no session"):
        site.session(RUN)
    with pytest.raises(MedfedError, match="holds no session"):  # nor after a restart
        fed.restart("site-a").session(RUN)
    fed.sites["site-a"].end_run(RUN)  # a second end is harmless


def test_session_and_pin_files_are_owner_only(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    ids = sorted(fed.sites)
    xs, ws = _updates(ids, 7)
    secure_round(fed, 1, xs, ws, ids)
    site = fed.sites["site-a"]
    assert _mode(site.store.path(RUN)) == 0o600
    assert _mode(site.pins.path) == 0o600
    assert _mode(site.store.root) == 0o700
    leftovers = [p for p in site.store.root.iterdir() if p.name.startswith(".")]
    assert leftovers == []  # no temporary file survives an atomic write


def test_old_session_files_are_pruned_at_start(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    folder = fed.folders["site-a"]
    fed.sites["site-a"].join("18", json.dumps(fed.config.to_dict()))
    old, fresh = (folder / SESSIONS_DIR / "17.json", folder / SESSIONS_DIR / "18.json")
    for path, days in ((old, 31), (fresh, 2)):
        stamp = time.time() - days * 86400
        os.utime(path, (stamp, stamp))
    SecureSite("site-a", folder)  # construction prunes after 30 days by default
    assert not old.exists() and fresh.exists()
    SecureSite("site-a", folder, keep_days=1)
    assert not fresh.exists()


def test_run_ids_cannot_escape_the_sessions_folder(tmp_path: Path) -> None:
    site = SecureSite("site-a", tmp_path)
    path = site.store.path("../../keys/secagg-identity")
    assert path.parent == site.store.root and path.name.startswith("h-")


def test_a_site_refuses_a_threshold_below_its_own_minimum_every_round(tmp_path: Path) -> None:
    """site.toml [privacy] secagg_min_participants: the site's floor, not the coordinator's."""
    fed = joined(tmp_path, n=4, threshold=1)  # rounds of 2 sites would pass
    fed.sites["site-a"].min_participants = 3
    x = np.full(64, 0.25, dtype=np.float32)
    for rnd in (1, 2):  # refused at the roster's round and after it alike
        with pytest.raises(ProtocolError, match="secagg_min_participants") as err:
            mask(fed, "site-a", rnd, x, 1.0, sorted(fed.sites))
        assert "--secagg-threshold to at least 2" in str(err.value)
        assert isinstance(err.value, BelowSiteMinimum)  # a refusal under the site's rule
    # a run whose threshold meets the floor is served
    ok = joined(tmp_path / "ok", n=4, threshold=2)
    ok.sites["site-a"].min_participants = 3
    assert mask(ok, "site-a", 1, x, 1.0, sorted(ok.sites)).server_round == 1
