"""Secure-aggregation protocol: sums, dropouts, late/tampered/replayed updates, strict mode."""

from __future__ import annotations

import ast
import dataclasses
import json
import struct
from pathlib import Path

import blake3
import numpy as np
import pytest
from secagg_builders import RUN, federation, run_round, updates, weighted_mean, wire

import medfed.core.secagg as secagg_pkg
from medfed.core import bulk_hash
from medfed.core.secagg import (
    KeyAdvert,
    LateUpdateError,
    MalformedMessageError,
    MaskedUpdate,
    ProtocolError,
    RecoveryError,
    ReplayedUpdateError,
    Roster,
    RosterError,
    TamperedUpdateError,
    TruncatedUpdateError,
    UnknownSiteError,
    UnmaskRequest,
    prg,
)
from medfed.core.secagg.messages import MAGIC

D = 257
MODES = ["default", "strict"]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("bits", [32, 64])
def test_sum_equals_plain_weighted_mean(mode: str, bits: int) -> None:
    fed = federation(4, size=D, mode=mode, modulus_bits=bits, threshold=2)
    xs, ws = updates(fed, D)
    mean, total = run_round(fed, 1, xs, ws)
    exact = weighted_mean(xs, ws, fed.ids)
    assert mean.dtype == np.float32 and mean.shape == (D,)
    assert total == sum(ws.values())
    assert np.abs(mean - exact).max() <= fed.aggregator.error_bound(1)


def test_no_dropout_default_round_is_one_message() -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    for s in fed.ids:
        agg.add(wire(fed.sessions[s].mask_update(1, xs[s], ws[s])))
    status = agg.close_collection(1, deadline_passed=False)  # all in: no deadline needed
    assert not status.needs_unmasking and status.dropped == ()
    assert np.abs(agg.result(1)[0] - weighted_mean(xs, ws, fed.ids)).max() <= agg.error_bound(1)


@pytest.mark.parametrize("mode", MODES)
def test_one_of_four_drops_gives_survivors_sum(mode: str) -> None:
    fed = federation(4, size=D, mode=mode, threshold=2)
    xs, ws = updates(fed, D)
    survivors = fed.ids[:2] + fed.ids[3:]  # site-c drops
    mean, total = run_round(fed, 1, xs, ws, senders=survivors)
    assert total == sum(ws[s] for s in survivors)
    exact = weighted_mean(xs, ws, survivors)
    assert np.abs(mean - exact).max() <= fed.aggregator.error_bound(1)
    # the next round runs with everyone again (keys are per run, seeds per round)
    mean2, _ = run_round(fed, 2, xs, ws)
    assert np.abs(mean2 - weighted_mean(xs, ws, fed.ids)).max() <= fed.aggregator.error_bound(2)


def test_reveal_is_audited_and_holds_only_round_seeds() -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(5)
    for s in fed.ids[1:]:
        agg.add(fed.sessions[s].mask_update(5, xs[s], ws[s]))
    status = agg.close_collection(5, deadline_passed=True)
    assert status.dropped == ("site-a",)
    sess = fed.sessions["site-b"]
    reveal = sess.reveal(status.unmask["site-b"])
    assert set(reveal.seeds) == {"site-a"} and not reveal.b_shares
    assert reveal.seeds["site-a"] != sess._pairs["site-a"]  # never the pair secret
    entry = sess.audit_entry(5)
    assert entry["reveal"]["server_declared_dropped"] == ["site-a"]
    assert entry["reveal"]["mask_seeds_revealed_with"] == ["site-a"]
    assert entry["protection"] == "secure-aggregation/default"


@pytest.mark.parametrize("mode", MODES)
def test_late_update_after_declared_dropout_is_refused(mode: str) -> None:
    fed = federation(4, size=D, mode=mode, threshold=2)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    late = fed.sessions["site-d"].mask_update(1, xs["site-d"], ws["site-d"])  # made, not yet in
    for s in fed.ids[:3]:
        agg.add(fed.sessions[s].mask_update(1, xs[s], ws[s]))
    status = agg.close_collection(1, deadline_passed=True)
    assert status.dropped == ("site-d",)
    with pytest.raises(LateUpdateError) as info:
        agg.add(late)
    assert info.value.site_id == "site-d"
    for k, request in status.unmask.items():
        agg.add_reveal(fed.sessions[k].reveal(request))
    agg.result(1)
    agg.begin_round(2)
    with pytest.raises(LateUpdateError, match="declared dropped"):
        agg.add(late)  # still refused in later rounds


def test_site_never_masks_after_deadline() -> None:
    fed = federation(3, size=D)
    xs, ws = updates(fed, D)
    with pytest.raises(LateUpdateError, match="deadline has passed"):
        fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"], deadline=100.0, now=101.0)
    fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"], deadline=100.0, now=99.0)


def test_dropouts_are_not_declared_before_the_deadline() -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    fed.aggregator.begin_round(1)
    fed.aggregator.add(fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"]))
    with pytest.raises(ProtocolError, match="only after the round deadline"):
        fed.aggregator.close_collection(1, deadline_passed=False)


def _opened(fed, rnd=1):  # type: ignore[no-untyped-def]
    xs, ws = updates(fed, D)
    fed.aggregator.begin_round(rnd)
    return xs, ws


def test_tampered_update_is_rejected_and_attributed() -> None:
    fed = federation(4, size=D)
    xs, ws = _opened(fed)
    upd = fed.sessions["site-b"].mask_update(1, xs["site-b"], ws["site-b"])
    vec = upd.vector.copy()
    vec[7] ^= 1
    with pytest.raises(TamperedUpdateError) as info:
        fed.aggregator.add(dataclasses.replace(upd, vector=vec))
    assert info.value.site_id == "site-b" and info.value.reason == "tampered"
    # a forged header (other participants) fails the signature as well
    with pytest.raises(TamperedUpdateError):
        fed.aggregator.add(dataclasses.replace(upd, participants=upd.participants[:3]))
    # a header claiming to be another site fails against that site's identity
    with pytest.raises(TamperedUpdateError) as info:
        fed.aggregator.add(dataclasses.replace(upd, site_id="site-c"))
    assert info.value.site_id == "site-c"
    fed.aggregator.add(upd)  # the genuine one is still accepted


@pytest.mark.parametrize("bits", [32, 64])
def test_a_tampered_vector_leaves_the_sum_as_it_was(bits: int) -> None:
    """The vector is added while its digest is checked; a mismatch takes it back out."""
    size = 700_000  # several 1 MiB segments, hashed and added on every core
    fed = federation(4, size=size, modulus_bits=bits)
    xs, ws = updates(fed, size)
    agg = fed.aggregator
    agg.begin_round(1)
    for s in fed.ids:
        upd = fed.sessions[s].mask_update(1, xs[s], ws[s])
        if s == "site-b":  # one forgery: a sum left holding it would decode to noise
            forged = upd.vector.copy()
            forged[-5] += 1  # in the last segment: every earlier one was added before the check
            assert agg._round is not None and agg._round.acc is not None
            before = agg._round.acc.copy()
            with pytest.raises(TamperedUpdateError):
                agg.add(dataclasses.replace(upd, vector=forged))
            np.testing.assert_array_equal(agg._round.acc, before)
        agg.add(upd)
    agg.close_collection(1, deadline_passed=False)
    mean, _ = agg.result(1)
    assert np.abs(mean - weighted_mean(xs, ws, fed.ids)).max() <= agg.error_bound(1)


def test_an_add_that_fails_part_way_loses_the_round_instead_of_decoding_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    agg.add(fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"]))

    def half_then_fail(acc: np.ndarray, vector: np.ndarray) -> bytes:
        np.add(acc[:10], vector[:10], out=acc[:10])
        raise MemoryError("interrupted")

    with monkeypatch.context() as m:
        m.setattr(bulk_hash, "add_and_digest", half_then_fail)
        with pytest.raises(MemoryError):
            agg.add(fed.sessions["site-b"].mask_update(1, xs["site-b"], ws["site-b"]))
    with pytest.raises(RecoveryError, match="part-way"):
        agg.add(fed.sessions["site-c"].mask_update(1, xs["site-c"], ws["site-c"]))
    with pytest.raises(RecoveryError, match="part-way"):
        agg.close_collection(1, deadline_passed=True)  # nobody is asked to reveal for it
    with pytest.raises(ProtocolError, match="still open"):
        agg.result(1)


def test_truncated_update_is_rejected_and_attributed() -> None:
    fed = federation(4, size=D)
    xs, ws = _opened(fed)
    blob = fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"]).to_bytes()
    cut = MaskedUpdate.from_bytes(blob[:-40])
    with pytest.raises(TruncatedUpdateError) as info:
        fed.aggregator.add(cut)
    assert info.value.site_id == "site-a"
    with pytest.raises(MalformedMessageError):
        MaskedUpdate.from_bytes(blob[:20])
    fed.aggregator.add(MaskedUpdate.from_bytes(blob))


def test_the_vector_is_hashed_by_segmented_blake3_and_other_hashes_are_refused_with_the_fix() -> (
    None
):
    fed = federation(4, size=D)
    xs, ws = _opened(fed)
    upd = fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"])
    # a hash list of 1 MiB segments (one segment here), as bulk_hash documents it
    listed = b"medfed segmented blake3 v1" + struct.pack("<QQ", upd.vector.nbytes, 1 << 20)
    expected = blake3.blake3(listed + blake3.blake3(upd.vector.tobytes()).digest()).digest()
    assert upd.digest == expected
    header, vector = upd.to_parts()
    body = json.loads(header[len(MAGIC) :])
    for older in ({**body, "hash": "sha256"}, {k: v for k, v in body.items() if k != "hash"}):
        with pytest.raises(MalformedMessageError, match="same medfed version") as info:
            MaskedUpdate.from_parts(MAGIC + json.dumps(older).encode(), vector)
        assert info.value.site_id == "site-a"
    fed.aggregator.add(MaskedUpdate.from_parts(header, vector))


def test_replayed_updates_are_rejected_and_attributed() -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    run_round(fed, 1, xs, ws)
    fed.aggregator.begin_round(2)
    first = fed.sessions["site-a"].mask_update(2, xs["site-a"], ws["site-a"])
    fed.aggregator.add(first)
    with pytest.raises(ReplayedUpdateError, match="second update") as info:
        fed.aggregator.add(first)  # duplicate
    assert info.value.site_id == "site-a"
    # an update of round 1 captured and replayed in round 2
    other = federation(4, size=D)  # same seeded keys: a valid round-1 update of site-b
    xs2, ws2 = updates(other, D)
    other.aggregator.begin_round(1)
    replay = other.sessions["site-b"].mask_update(1, xs2["site-b"], ws2["site-b"])
    with pytest.raises(ReplayedUpdateError, match="past round 1"):
        fed.aggregator.add(replay)
    # an update from another run signed by the same identity
    foreign = federation(4, size=D, run_id="run-0002")
    foreign.aggregator.begin_round(2)
    xs3, ws3 = updates(foreign, D)
    alien = foreign.sessions["site-b"].mask_update(2, xs3["site-b"], ws3["site-b"])
    with pytest.raises(ReplayedUpdateError, match="run-0002"):
        fed.aggregator.add(alien)


def test_unknown_site_is_rejected() -> None:
    fed = federation(3, size=D)
    xs, ws = _opened(fed)
    upd = fed.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"])
    with pytest.raises(UnknownSiteError):
        fed.aggregator.add(dataclasses.replace(upd, site_id="site-z"))


def test_masks_differ_across_rounds() -> None:
    fed = federation(3, size=D)
    sess = fed.sessions["site-a"]
    x = np.zeros(D, np.float32)
    u1 = sess.mask_update(1, x, 10.0).vector
    u2 = sess.mask_update(2, x, 10.0).vector
    assert np.count_nonzero(u1 == u2) < 5  # same input, fresh masks
    s1 = prg.round_mask_seed(sess._pairs["site-b"], RUN, 1, "site-a", "site-b")
    s2 = prg.round_mask_seed(sess._pairs["site-b"], RUN, 2, "site-a", "site-b")
    assert s1 != s2
    with pytest.raises(ProtocolError, match="already masked"):
        sess.mask_update(2, x, 10.0)  # never mask a round twice
    with pytest.raises(ProtocolError, match="already masked"):
        sess.mask_update(1, x, 10.0)


def test_pairwise_masks_cancel_and_are_symmetric() -> None:
    fed = federation(3, size=D)
    a, b = fed.sessions["site-a"], fed.sessions["site-b"]
    assert a._pairs["site-b"] == b._pairs["site-a"]


def test_strict_mode_reconstructs_with_threshold_and_fails_below() -> None:
    fed = federation(5, size=D, mode="strict", threshold=3)
    xs, ws = updates(fed, D)
    # 4 survivors >= t + 1: works
    mean, _ = run_round(fed, 1, xs, ws, senders=fed.ids[:4])
    exact = weighted_mean(xs, ws, fed.ids[:4])
    assert np.abs(mean - exact).max() <= fed.aggregator.error_bound(1)
    # 3 survivors < t + 1 = 4: the server says so and no site would reveal
    agg = fed.aggregator
    agg.begin_round(2)
    for s in fed.ids[:3]:
        agg.add(fed.sessions[s].mask_update(2, xs[s], ws[s]))
    with pytest.raises(RecoveryError, match="3 survivors, at least 4 needed"):
        agg.close_collection(2, deadline_passed=True)
    lying = UnmaskRequest(RUN, 2, "site-a", tuple(fed.ids[:3]), tuple(fed.ids[3:]))
    with pytest.raises(ProtocolError, match="only 3 survivors"):
        fed.sessions["site-a"].reveal(lying)


def test_strict_mode_needs_t_reveals_of_self_mask_shares() -> None:
    fed = federation(4, size=D, mode="strict", threshold=3)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    for s in fed.ids:
        agg.add(fed.sessions[s].mask_update(1, xs[s], ws[s]))
    status = agg.close_collection(1, deadline_passed=False)
    assert status.needs_unmasking  # strict: always one unmasking message
    for k in fed.ids[:2]:  # only 2 of 4 answer: 1-2 shares per seed < t = 3
        agg.add_reveal(fed.sessions[k].reveal(status.unmask[k]))
    with pytest.raises(RecoveryError, match="threshold is 3"):
        agg.result(1)


def test_strict_mode_hides_an_update_the_server_falsely_declares_dropped() -> None:
    fed = federation(4, size=D, mode="strict", threshold=2)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    ups = {s: fed.sessions[s].mask_update(1, xs[s], ws[s]) for s in fed.ids}
    for s in fed.ids[:3]:
        agg.add(ups[s])
    status = agg.close_collection(1, deadline_passed=True)  # holds back site-d's update
    reveals = {k: fed.sessions[k].reveal(status.unmask[k]) for k in status.survivors}
    assert all("site-d" not in r.b_shares for r in reveals.values())  # b_d never revealed
    # relaying site-d's shares while calling it dropped is caught by the sites
    bad = dataclasses.replace(
        status.unmask["site-a"], shares={"site-d": ups["site-d"].shares["site-a"]}
    )
    fresh = federation(4, size=D, mode="strict", threshold=2)
    fresh.sessions["site-a"].mask_update(1, xs["site-a"], ws["site-a"])
    with pytest.raises(ProtocolError, match="which it says dropped"):
        fresh.sessions["site-a"].reveal(bad)


def test_server_cannot_change_its_dropout_story() -> None:
    fed = federation(4, size=D, threshold=1)
    xs, ws = updates(fed, D)
    sess = fed.sessions["site-a"]
    sess.mask_update(1, xs["site-a"], ws["site-a"])
    first = UnmaskRequest(RUN, 1, "site-a", ("site-a", "site-b", "site-c"), ("site-d",))
    again = UnmaskRequest(RUN, 1, "site-a", ("site-a", "site-b"), ("site-c", "site-d"))
    r1 = sess.reveal(first)
    assert sess.reveal(first) == r1  # an identical retry gets the same answer
    with pytest.raises(ProtocolError, match="changed its account"):
        sess.reveal(again)
    assert sess.audit_entry(1)["refused"]
    me_dropped = UnmaskRequest(RUN, 1, "site-b", ("site-a", "site-c"), ("site-b", "site-d"))
    fed.sessions["site-b"].mask_update(1, xs["site-b"], ws["site-b"])
    with pytest.raises(ProtocolError, match="lists this site as dropped"):
        fed.sessions["site-b"].reveal(me_dropped)


def test_reveals_are_authenticated() -> None:
    fed = federation(4, size=D)
    xs, ws = updates(fed, D)
    agg = fed.aggregator
    agg.begin_round(1)
    for s in fed.ids[:3]:
        agg.add(fed.sessions[s].mask_update(1, xs[s], ws[s]))
    status = agg.close_collection(1, deadline_passed=True)
    reveal = fed.sessions["site-a"].reveal(status.unmask["site-a"])
    forged = dataclasses.replace(reveal, seeds={"site-d": b"\x00" * 32})
    with pytest.raises(TamperedUpdateError) as info:
        agg.add_reveal(forged)
    assert info.value.site_id == "site-a"
    agg.add_reveal(reveal)
    with pytest.raises(ReplayedUpdateError):
        agg.add_reveal(reveal)
    with pytest.raises(RecoveryError, match="no reveal yet from"):
        agg.result(1)


def test_substituted_key_is_detected() -> None:
    fed = federation(3, size=D)
    adverts = list(fed.roster.adverts)
    mitm = KeyAdvert(adverts[1].site_id, RUN, b"\x09" * 32, adverts[1].signature)
    bad = Roster.of(RUN, [adverts[0], mitm, adverts[2]])
    with pytest.raises(RosterError, match="does not verify"):
        fed.sessions["site-a"].accept_roster(bad)
    stale = federation(3, size=D, run_id="run-old").roster
    with pytest.raises(RosterError, match="run-old"):
        fed.sessions["site-a"].accept_roster(Roster(RUN, stale.adverts))


def test_participants_below_threshold_are_refused() -> None:
    fed = federation(4, size=D, threshold=2)
    with pytest.raises(ProtocolError, match="at least 3"):
        fed.sessions["site-a"].mask_update(
            1, np.zeros(D, np.float32), 1.0, participants=["site-a", "site-b"]
        )


def test_core_imports_no_flower_or_role_packages() -> None:
    allowed = {"numpy", "cryptography", "medfed", "__future__"}
    stdlib = {
        "base64",
        "hashlib",
        "json",
        "math",
        "secrets",
        "struct",
        "time",
        "collections",
        "dataclasses",
        "typing",
        "itertools",
        "os",
    }
    for path in Path(secagg_pkg.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed | stdlib, f"{path.name} imports {name}"
                if top == "medfed":
                    assert name.startswith("medfed.core"), f"{path.name} imports {name}"
