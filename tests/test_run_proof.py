"""Sites train only runs a coordinator signed (medfed/core/run_proof.py, client/worker.py).

A coordinator's credential carries a certificate of the federation CA; the run's JSON
travels with its signature from `Control.submit` through the ServerApp to each site,
whose worker checks both against the CA it pinned before it trains, joins or spends.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import serialization

from medfed.client.worker import SiteWorker
from medfed.core import wire
from medfed.core.config import RunConfig, SiteConfig, validate
from medfed.core.identity import CertificateAuthority
from medfed.core.packing import WEIGHTS_KEY, pack
from medfed.core.run_proof import RunProofError, verify_run
from medfed.server.coordinators import CoordinatorCredential
from medfed.server.federation import Federation, init_federation
from medfed.tasks import engine, get_task

RUN = RunConfig(secure_aggregation="off", task="tiny-seg").to_json()


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create("signed-runs")


@pytest.fixture
def alice(ca: CertificateAuthority, tmp_path: Path) -> CoordinatorCredential:
    return CoordinatorCredential.create(tmp_path / "alice.key", "alice", ca=ca)


def test_a_signed_run_verifies_and_every_change_or_stranger_is_refused(
    ca: CertificateAuthority, alice: CoordinatorCredential, tmp_path: Path
) -> None:
    proof = alice.sign_run(RUN)
    assert verify_run(RUN, proof, [ca.cert]).coordinator == "alice"
    # every launch has its own proof, even of the same configuration (a fresh nonce)
    assert (
        verify_run(RUN, alice.sign_run(RUN), [ca.cert]).digest
        != verify_run(RUN, proof, [ca.cert]).digest
    )
    loaded = CoordinatorCredential.load(tmp_path / "alice.key")  # the certificate travels too
    assert verify_run(RUN, loaded.sign_run(RUN), [ca.cert]).coordinator == "alice"
    changed = RUN.replace('"rounds":', '"rounds": 1, "x":', 1)
    with pytest.raises(RunProofError, match="does not match coordinator 'alice'"):
        verify_run(changed, proof, [ca.cert])
    with pytest.raises(RunProofError, match="no coordinator signature"):
        verify_run(RUN, "", [ca.cert])
    other = CertificateAuthority.create("elsewhere")
    with pytest.raises(RunProofError, match="not issued by the federation CA"):
        verify_run(RUN, proof, [other.cert])
    assert verify_run(RUN, proof, [other.cert, ca.cert]).coordinator == "alice"  # rotation
    later = dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=900)
    with pytest.raises(RunProofError, match="not valid now"):
        verify_run(RUN, proof, [ca.cert], now=later)
    # a certificate the CA issued for something else (the server's TLS) cannot sign runs
    _, server_cert = ca.issue_server_cert(["127.0.0.1"])
    forged = json.loads(proof)
    forged["certificate"] = server_cert.public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(RunProofError, match="not one for coordinator 'alice'"):
        verify_run(RUN, json.dumps(forged), [ca.cert])
    renamed = {**json.loads(proof), "coordinator": "bob"}
    with pytest.raises(RunProofError, match="not one for coordinator 'bob'"):
        verify_run(RUN, json.dumps(renamed), [ca.cert])
    with pytest.raises(RunProofError, match="malformed"):
        verify_run(RUN, "{not json", [ca.cert])


def _worker(tmp_path: Path, ca: CertificateAuthority) -> SiteWorker:
    (tmp_path / "federation-ca.pem").write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    cfg = validate(
        SiteConfig,
        {"site": {"name": "site-x"}, "data": {"num_samples": 32}, "compute": {"threads": 1}},
        where="test",
    )
    return SiteWorker(cfg, tmp_path / "site.toml", verify_identities=True)


def _train(
    worker: SiteWorker, proof: str | None, *, server_run: int = 7, revocations: str = ""
) -> wire.Frame:
    torch.manual_seed(0)
    weights = {WEIGHTS_KEY: pack(engine.get_weights(get_task("tiny-seg").build_model()))}
    config = {
        wire.RUN_CONFIG_KEY: RUN,
        wire.SERVER_ROUND_KEY: 1,
        **({wire.RUN_PROOF_KEY: proof} if proof is not None else {}),
        **({wire.REVOCATIONS_KEY: revocations} if revocations else {}),
    }
    return worker.handle(
        wire.Frame({"op": "train", "run_id": server_run, "config": config}, weights)
    )


def test_a_site_daemons_worker_trains_only_signed_runs_and_audits_each_refusal(
    ca: CertificateAuthority, alice: CoordinatorCredential, tmp_path: Path
) -> None:
    worker = _worker(tmp_path, ca)
    mallory = CoordinatorCredential.create(
        tmp_path / "m.key", "alice", ca=CertificateAuthority.create("rogue")
    )
    for proof, why in (
        (None, "no coordinator signature"),
        (mallory.sign_run(RUN), "not issued by the federation CA"),
        (alice.sign_run(RUN.replace("tiny-seg", "tiny-seg ")), "does not match"),
    ):
        reply = _train(worker, proof)
        assert reply.header["status"] == "refused" and reply.header["rule"] == "run.signature"
        assert why in reply.header["reason"]
    refused = [r for r in worker.audit.read() if r["event"] == "refused"]
    assert [r["rule"] for r in refused] == ["run.signature"] * 3
    assert not any(r["event"] == "update-sent" for r in worker.audit.read())
    launch = alice.sign_run(RUN)
    reply = _train(worker, launch)
    assert reply.header["ok"], reply.header
    assert np.isfinite(reply.arrays[WEIGHTS_KEY]).all()
    # the same launch replayed as another server run is refused, also after a restart
    again = _worker(tmp_path, ca)
    reply = _train(again, launch, server_run=8)
    assert reply.header["rule"] == "run.signature"
    assert "already trained as server run 7" in reply.header["reason"]
    assert _train(again, alice.sign_run(RUN), server_run=8).header["ok"]  # a new launch


def test_a_recertified_credential_keeps_its_key_and_verifies_under_the_new_ca(
    alice: CoordinatorCredential, tmp_path: Path
) -> None:
    new_ca = CertificateAuthority.create("next")
    again = alice.recertify(tmp_path / "alice.key", new_ca)
    assert again.public_pem() == alice.public_pem()  # the Control API registry still holds
    assert (
        verify_run(
            RUN, CoordinatorCredential.load(tmp_path / "alice.key").sign_run(RUN), [new_ca.cert]
        ).coordinator
        == "alice"
    )


def test_a_revoked_coordinators_runs_are_refused_at_sites_and_stay_refused(tmp_path: Path) -> None:
    fed = Federation.load(
        init_federation(tmp_path / "fed", name="f", hosts=["127.0.0.1"], port=9999)
    )
    ca = fed.certificate_authority()
    bob = CoordinatorCredential.create(tmp_path / "bob.key", "bob", ca=ca)
    fed.coordinators.add("bob", bob.public_pem(), bob.certificate_pem())
    (tmp_path / "site").mkdir()
    worker = _worker(tmp_path / "site", ca)
    assert _train(worker, bob.sign_run(RUN), server_run=1).header["ok"]
    assert fed.revoke_coordinator("bob")
    listed = fed.revocations_file.read_text()
    # the next message the server sends carries the CA's list: bob's run is refused
    reply = _train(worker, bob.sign_run(RUN), server_run=2, revocations=listed)
    assert reply.header["rule"] == "run.signature" and "'bob' was revoked" in reply.header["reason"]
    # the site keeps it: a relay that withholds it, or sends an older one, changes nothing
    older = ca.issue_revocations([], number=0).public_bytes(serialization.Encoding.PEM).decode()
    for attached in ("", older):
        again = _worker(tmp_path / "site", ca)  # also after a daemon restart
        assert (
            "'bob' was revoked"
            in _train(again, bob.sign_run(RUN), server_run=3, revocations=attached).header["reason"]
        )
    forged = CertificateAuthority.create("f").issue_revocations([], number=99)
    reply = _train(
        worker,
        fed.credential().sign_run(RUN),
        server_run=4,
        revocations=forged.public_bytes(serialization.Encoding.PEM).decode(),
    )
    assert "not signed by the federation CA" in reply.header["reason"]
    # the federation's other coordinator is unaffected
    assert _train(worker, fed.credential().sign_run(RUN), server_run=5, revocations=listed).header[
        "ok"
    ]
    assert [r["rule"] for r in worker.audit.read() if r["event"] == "refused"] == [
        "run.signature"
    ] * 4


def test_the_server_passes_on_the_revocation_list_current_at_each_round(
    ca: CertificateAuthority, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from flwr.app import ConfigRecord

    from medfed.server.app import REVOCATIONS_ENV, pass_on_revocations

    crl = tmp_path / "revoked-coordinators.pem"
    monkeypatch.setenv(REVOCATIONS_ENV, str(crl))
    entries = {wire.RUN_CONFIG_KEY: RUN}
    train, evaluate = ConfigRecord(entries), ConfigRecord(entries)
    pass_on_revocations(entries, train, evaluate)  # nobody revoked yet: nothing attached
    assert all(wire.REVOCATIONS_KEY not in h for h in (entries, train, evaluate))
    for number in (0, 1):  # a revocation during the run reaches the next round's messages
        crl.write_bytes(
            ca.issue_revocations([100 + number], number=number).public_bytes(
                serialization.Encoding.PEM
            )
        )
        pass_on_revocations(entries, train, evaluate)
        assert (
            entries[wire.REVOCATIONS_KEY]
            == train[wire.REVOCATIONS_KEY]
            == evaluate[wire.REVOCATIONS_KEY]
            == crl.read_text()
        )
