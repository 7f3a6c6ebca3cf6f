"""Trust on first use of peer identity keys, and `medfed site peers`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from secure_site_builders import RUN, joined, mask, train_message
from typer.testing import CliRunner

from medfed.cli import site_cmd
from medfed.client.peer_pins import PeerPins
from medfed.client.secure_site import load_identity
from medfed.core.errors import MedfedError
from medfed.core.schema import SiteInstruction
from medfed.core.secagg import RosterError, SiteIdentity, fingerprint

D = 16


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, D).astype(np.float32)


def _first_round(fed, site: str, directory: dict[str, bytes] | None = None) -> dict:
    config, blobs = train_message(fed, sorted(fed.sites), directory)
    _, _, entry = fed.sites[site].mask(
        RUN,
        1,
        SiteInstruction.read(config, blobs),
        global_vec=np.zeros(D, np.float32),
        local_vec=_x(1),
        weight=10.0,
    )
    return entry


def test_first_directory_pins_every_peer_and_audits_it(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    entry = _first_round(fed, "site-a")
    peers = {s: fingerprint(fed.directory[s]) for s in ("site-b", "site-c")}
    assert entry["peers_pinned"] == peers  # what the worker writes to the audit log
    pins = fed.sites["site-a"].pins.load()
    assert sorted(pins) == ["site-b", "site-c"]  # never the site itself
    assert pins["site-b"].key == fed.directory["site-b"] and pins["site-b"].run_id == RUN
    assert pins["site-b"].first_seen[:4].isdigit()
    # a second run with the same keys pins nothing new
    assert fed.sites["site-a"].pins.check(fed.directory, own="site-a") == []


def test_changed_peer_key_is_refused_naming_the_peer(tmp_path: Path) -> None:
    fed = joined(tmp_path / "run1", 3, size=D)
    _first_round(fed, "site-a")
    pins_file = fed.sites["site-a"].pins.path
    # the next run: the server relays another key for site-b (substitution or re-key)
    impostor = SiteIdentity.generate().public_bytes
    directory = {**fed.directory, "site-b": impostor}
    fed.sites["site-a"].join("18", json.dumps(fed.config.to_dict()))
    config, blobs = train_message(fed, sorted(fed.sites), directory)
    with pytest.raises(RosterError) as err:
        fed.sites["site-a"].mask(
            "18",
            1,
            SiteInstruction.read(config, blobs),
            global_vec=np.zeros(D, np.float32),
            local_vec=_x(2),
            weight=10.0,
        )
    text = str(err.value)
    assert "'site-b'" in text and str(pins_file) in text
    assert fingerprint(fed.directory["site-b"]) in text and fingerprint(impostor) in text
    assert "medfed site peers --config site.toml --forget site-b" in text
    assert PeerPins(pins_file).load()["site-b"].key == fed.directory["site-b"]  # pin unchanged
    assert not fed.sites["site-a"].session("18").has_roster  # nothing was masked


def test_forget_then_the_new_key_is_accepted(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    pins = fed.sites["site-a"].pins
    old_b = SiteIdentity.generate().public_bytes
    pins.add({"site-b": old_b}, ["site-b"], run_id="16")  # an earlier key of site-b
    with pytest.raises(RosterError, match="site-b"):
        _first_round(fed, "site-a")
    assert pins.forget("site-b").key == old_b
    entry = _first_round(fed, "site-a")  # same run: the round is taken up again
    assert entry["peers_pinned"]["site-b"] == fingerprint(fed.directory["site-b"])
    assert pins.load()["site-b"].key == fed.directory["site-b"]


def test_forget_unknown_peer_says_did_you_mean(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    _first_round(fed, "site-a")
    with pytest.raises(MedfedError, match="did you mean 'site-b'"):
        fed.sites["site-a"].pins.forget("site-bb")


def test_masked_round_still_sums_with_pinning(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    ids = sorted(fed.sites)
    agg = fed.aggregator
    agg.begin_round(1, participants=ids)
    for i, s in enumerate(ids):
        agg.add(mask(fed, s, 1, _x(i), 1.0, ids))
    agg.close_collection(1, deadline_passed=True)
    mean, total = agg.result(1)
    assert total == 3.0
    assert np.abs(mean - np.mean([_x(i) for i in range(3)], axis=0)).max() <= agg.error_bound(1)


# ------------------------------------------------------------------ the CLI


def _site_toml(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "site.toml").write_text('[site]\nname = "site-a"\n', encoding="utf-8")
    return folder / "site.toml"


def test_cli_lists_pins_with_own_fingerprint_and_forgets_one(tmp_path: Path) -> None:
    fed = joined(tmp_path, 3, size=D)
    _first_round(fed, "site-a")
    config = _site_toml(fed.folders["site-a"])
    runner = CliRunner()
    out = runner.invoke(site_cmd.app, ["peers", "--config", str(config)])
    assert out.exit_code == 0, out.output
    own = fingerprint(load_identity(fed.folders["site-a"]).public_bytes)
    assert own in out.output
    for s in ("site-b", "site-c"):
        assert s in out.output and fingerprint(fed.directory[s]) in out.output

    out = runner.invoke(site_cmd.app, ["peers", "--config", str(config), "--forget", "site-b"])
    assert out.exit_code == 0 and "forgot" in out.output
    assert sorted(fed.sites["site-a"].pins.load()) == ["site-c"]
    out = runner.invoke(site_cmd.app, ["peers", "--config", str(config)])
    assert "site-c" in out.output and fingerprint(fed.directory["site-b"]) not in out.output


def test_cli_forget_unknown_peer_is_a_user_error(tmp_path: Path) -> None:
    config = _site_toml(tmp_path / "site")
    out = CliRunner().invoke(site_cmd.app, ["peers", "--config", str(config), "--forget", "x"])
    assert out.exit_code != 0 and isinstance(out.exception, MedfedError)
    assert "No pinned peer named 'x'" in str(out.exception)


def test_cli_shows_own_fingerprint_before_any_run(tmp_path: Path) -> None:
    config = _site_toml(tmp_path / "site")
    out = CliRunner().invoke(site_cmd.app, ["peers", "--config", str(config)])
    assert out.exit_code == 0, out.output
    own = fingerprint(load_identity(tmp_path / "site").public_bytes)  # created on first use
    assert f"'site-a': {own}" in out.output
