"""Only registered coordinators may use the SuperLink's Control API (server/coordinators.py).

Unit tests of the signature, the registry and the ASGI gate; then a real SuperLink on
127.0.0.1 (TLS) where plain Flower clients holding only the CA certificate are refused
RegisterNode, StartRun, StopRun and ListRuns, a registered coordinator is served, and a
revoked one is refused, every call in the control audit log.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.control import ControlHttpClient

from medfed.core.config import SuperLinkSection
from medfed.core.errors import ConfigError, MedfedError
from medfed.core.identity import CertificateAuthority
from medfed.server.control_sources import is_this_host
from medfed.server.coordinators import (
    HEADER_NAME,
    MAX_SKEW_S,
    ControlGate,
    CoordinatorCredential,
    CoordinatorRegistry,
    NonceLedger,
    Refused,
)

PATH = "/v1/control/start-run"
CA = CertificateAuthority.create("gate")


@pytest.fixture
def registry(tmp_path: Path) -> tuple[CoordinatorRegistry, CoordinatorCredential]:
    registry = CoordinatorRegistry(tmp_path / "coordinators.toml")
    alice = CoordinatorCredential.create(tmp_path / "alice.key", "alice", ca=CA)
    registry.add("alice", alice.public_pem())
    return registry, alice


def test_a_signed_request_names_its_coordinator_and_any_change_breaks_it(
    registry: tuple[CoordinatorRegistry, CoordinatorCredential], tmp_path: Path
) -> None:
    reg, alice = registry
    headers = alice.headers("POST", PATH, b"body", now=1000.0)
    assert reg.verify(dict(headers), "POST", PATH, b"body", now=1000.0) == "alice"
    for method, path, body in (
        ("POST", PATH, b"bodY"),
        ("POST", "/v1/control/stop-run", b"body"),
        ("GET", PATH, b"body"),
    ):
        with pytest.raises(Refused, match="does not verify"):
            reg.verify(dict(headers), method, path, body, now=1000.0)
    mallory = CoordinatorCredential.create(tmp_path / "m.key", "alice", ca=CA)  # own key
    with pytest.raises(Refused, match="does not verify"):
        reg.verify(mallory.headers("POST", PATH, b""), "POST", PATH, b"")
    with pytest.raises(Refused, match="off the server's clock"):
        reg.verify(dict(headers), "POST", PATH, b"body", now=1000.0 + MAX_SKEW_S + 1)
    with pytest.raises(Refused, match="no coordinator credential"):
        reg.verify({}, "POST", PATH, b"")
    with pytest.raises(Refused, match="unknown coordinator 'bob'"):
        reg.verify({**headers, HEADER_NAME: "bob"}, "POST", PATH, b"body", now=1000.0)
    reg.revoke("alice")
    with pytest.raises(Refused, match="'alice' was revoked"):
        reg.verify(dict(headers), "POST", PATH, b"body", now=1000.0)
    with pytest.raises(ConfigError, match="was revoked"):
        reg.add("alice", alice.public_pem())  # a revoked name cannot come back


def test_a_replayed_request_and_a_credential_file_of_another_kind_are_refused(
    registry: tuple[CoordinatorRegistry, CoordinatorCredential], tmp_path: Path
) -> None:
    ledger = NonceLedger()
    ledger.check("n1", 0.0)
    with pytest.raises(Refused, match="replay"):
        ledger.check("n1", 1.0)
    _, alice = registry
    assert CoordinatorCredential.load(tmp_path / "alice.key").public_pem() == alice.public_pem()
    assert (tmp_path / "alice.key").stat().st_mode & 0o077 == 0
    (tmp_path / "other.pem").write_text("-----BEGIN PRIVATE KEY-----\n")
    with pytest.raises(ConfigError, match="Not a medfed coordinator credential"):
        CoordinatorCredential.load(tmp_path / "other.pem")
    with pytest.raises(ConfigError, match="credential is missing") as missing:
        CoordinatorCredential.load(tmp_path / "none.key")
    assert "coordinators add" in missing.value.fix


def _call(
    gate: ControlGate, path: str, body: bytes, headers: dict[str, str], *, client: str = "10.0.0.9"
) -> tuple[int, bytes]:
    sent: list[dict[str, Any]] = []
    chunks = [
        {"type": "http.request", "body": body[:3], "more_body": True},
        {"type": "http.request", "body": body[3:], "more_body": False},
    ]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": path,
        "client": (client, 5555),
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(gate(scope, receive, send))
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_the_gate_passes_fleet_calls_and_only_signed_control_calls(
    registry: tuple[CoordinatorRegistry, CoordinatorCredential], tmp_path: Path
) -> None:
    reg, alice = registry
    seen: list[bytes] = []

    async def flower(scope: Any, receive: Any, send: Any) -> None:
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message["body"], message["more_body"]
        seen.append(body)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    audit = tmp_path / "control-audit.jsonl"
    gate = ControlGate(flower, registry=str(reg.path), audit=str(audit))
    assert _call(gate, "/v1/fleet/pull-messages", b"abcdef", {}) == (200, b"ok")
    status, text = _call(gate, PATH, b"abcdef", {})
    assert status == 401 and b"no coordinator credential" in text
    assert seen == [b"abcdef"], "a refused call never reaches Flower"
    signed = alice.headers("POST", PATH, b"abcdef")
    assert _call(gate, PATH, b"abcdef", signed) == (200, b"ok")
    assert seen[-1] == b"abcdef", "Flower reads the whole body the gate read"
    status, text = _call(gate, PATH, b"abcdef", signed)  # the same request again
    assert status == 401 and b"replay" in text
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [(r["coordinator"], r["call"], r["allowed"]) for r in records] == [
        ("", "start-run", False),
        ("alice", "start-run", True),
        ("alice", "start-run", False),
    ]
    assert records[0]["peer"] == "10.0.0.9:5555"
    closed = ControlGate(flower, registry="", audit="")  # no registry: fail closed
    assert _call(closed, PATH, b"abcdef", alice.headers("POST", PATH, b"abcdef"))[0] == 401


def _flower_ok() -> Any:
    async def flower(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return flower


def test_control_calls_come_only_from_the_admitted_sources(
    registry: tuple[CoordinatorRegistry, CoordinatorCredential], tmp_path: Path
) -> None:
    reg, alice = registry
    outside = "192.0.2.7"  # TEST-NET-1: never this machine's
    assert is_this_host("127.0.0.1") and is_this_host("::1") and not is_this_host(outside)
    gate = ControlGate(
        _flower_ok(),
        registry=str(reg.path),
        audit=str(tmp_path / "a.jsonl"),
        control_from='["this-host"]',
    )
    status, text = _call(
        gate, PATH, b"abcdef", alice.headers("POST", PATH, b"abcdef"), client=outside
    )
    assert status == 401
    assert b"only from this-host (server.toml [superlink] control_from)" in text
    assert b"came from 192.0.2.7" in text
    assert _call(gate, "/v1/fleet/pull-messages", b"abcdef", {}, client=outside)[0] == 200
    assert _call(
        gate, PATH, b"abcdef", alice.headers("POST", PATH, b"abcdef"), client="127.0.0.1"
    ) == (200, b"ok")
    lan = ControlGate(_flower_ok(), registry=str(reg.path), control_from='["192.0.2.0/24"]')
    assert _call(lan, PATH, b"abcdef", alice.headers("POST", PATH, b"abcdef"), client=outside) == (
        200,
        b"ok",
    )
    status, text = _call(lan, PATH, b"abcdef", {}, client=outside)
    assert status == 401 and b"no coordinator credential" in text  # a signature is still due
    with pytest.raises(ValueError, match="'nope' is not 'this-host', 'any' or a network"):
        SuperLinkSection(control_from=["this-host", "nope"])


@pytest.mark.slow
def test_a_real_superlink_serves_only_registered_coordinators(short_tmp: Path) -> None:
    from medfed.cli.main import main
    from medfed.local import LocalFederation
    from medfed.server.control import Control
    from medfed.server.superlink import start_superlink

    fed = LocalFederation(short_tmp, [], name="locked").create().fed
    address = fed.config.superlink.address
    link = start_superlink(fed)
    try:
        # an outsider with the CA certificate and a plain Flower client
        outsider = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=str(fed.ca_cert),
            interceptors=[],
        )
        calls = [
            (outsider.RegisterNode, RegisterNodeRequest(public_key=b"x", name="rogue")),
            (outsider.StartRun, StartRunRequest()),
            (outsider.StopRun, StopRunRequest(run_id=1)),
            (outsider.ListRuns, ListRunsRequest()),
        ]
        for call, request in calls:
            with pytest.raises(httpx.HTTPStatusError) as refused:
                call(request)
            assert refused.value.response.status_code == 401
            assert "no coordinator credential" in refused.value.response.text
        outsider.close()
        with Control(address, fed.ca_cert, fed.credential()) as control:
            assert control.runs() == [] and control.nodes() == []  # nothing got registered
        with pytest.raises(SystemExit):
            main(
                [
                    "server",
                    "coordinators",
                    "add",
                    "bob",
                    "--out",
                    str(short_tmp / "bob.key"),
                    "--config",
                    str(fed.config_path),
                ]
            )
        bob = CoordinatorCredential.load(short_tmp / "bob.key")
        with Control(address, fed.ca_cert, bob) as control:
            assert control.runs() == []
            with pytest.raises(SystemExit):
                main(["server", "coordinators", "revoke", "bob", "--config", str(fed.config_path)])
            with pytest.raises(MedfedError, match="was revoked") as revoked:
                control.runs()
            assert "coordinator 'bob'" in revoked.value.what
        with Control(address, fed.ca_cert) as control:  # no credential at all
            with pytest.raises(MedfedError, match="no coordinator credential"):
                control.runs()
    finally:
        link.stop()
    records = [
        json.loads(line)
        for line in fed.path(fed.config.state.control_audit_log).read_text().splitlines()
    ]
    allowed = {(r["coordinator"], r["call"]) for r in records if r["allowed"]}
    refused_calls = {r["call"] for r in records if not r["allowed"] and not r["coordinator"]}
    assert {("coordinator", "list-runs"), ("bob", "list-runs")} <= allowed
    assert {"register-node", "start-run", "stop-run", "list-runs"} <= refused_calls
    assert any(r["coordinator"] == "bob" and not r["allowed"] for r in records)
