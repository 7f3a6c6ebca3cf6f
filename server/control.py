"""The coordinator's client of the SuperLink Control API (HTTPS, pinned to the federation CA).

Submits runs, registers (enrols) site keys, lists nodes and runs, stops runs.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import httpx
from flwr.cli.build import build_fab_from_files
from flwr.cli.cli_client_interceptor import CliClientHttpInterceptor
from flwr.common.serde import fab_to_proto, user_config_to_proto
from flwr.proto.control_pb2 import (  # pylint: disable=E0611
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    StartRunRequest,
    StopRunRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.fab import Fab
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor

from medfed.core import wire
from medfed.core.config import RunConfig
from medfed.core.errors import MedfedError
from medfed.core.identity import TlsProblem, diagnose_tls
from medfed.server.coordinators import CoordinatorCredential, CoordinatorSigner


def _fab_bytes() -> bytes:
    pyproject = files("medfed.server").joinpath("flower_app/pyproject.toml").read_bytes()
    return build_fab_from_files({"pyproject.toml": pyproject})[0]


@dataclass(frozen=True)
class RunInfo:
    """A run as the SuperLink reports it."""

    run_id: int
    status: str
    sub_status: str
    details: str
    pending_at: str
    running_at: str
    finished_at: str


class ServerUnreachable(MedfedError):
    """Nothing answers at the server's address (it is not running, or the address is wrong)."""


def tls_error(address: str, ca_cert: Path, *, what: str) -> MedfedError:
    """Why the server at ``address`` failed TLS with the CA ``ca_cert``, for the coordinator."""
    d = diagnose_tls(address, ca_cert)
    problem = d.problem if d is not None else None
    head = f"The server at {address} cannot {what}: its TLS certificate is refused"
    if problem is TlsProblem.UNKNOWN_CA:
        return MedfedError(
            f"{head}: {d.detail} ({ca_cert}). Another federation's server or another "
            "program answers at this address, or the server's certificate or this CA file "
            "was replaced.",
            where=address,
            expected=f"a certificate issued by the federation CA in {ca_cert}",
            fix="check superlink.public_host and superlink.port in server.toml and that "
            "`medfed server start` runs with this server.toml; after `medfed server "
            "rotate-ca --finish` use the federation's new ca/ca.pem",
        )
    if problem is TlsProblem.SERVER_CERT_EXPIRED:
        return MedfedError(
            f"{head}: {d.detail}.",
            where=address,
            fix="run `medfed server renew-cert --config server.toml`: the running server "
            "serves the new certificate at once and the sites reconnect on their own",
        )
    if problem is TlsProblem.PINNED_CA_EXPIRED:
        return MedfedError(
            f"{head}: {d.detail} ({ca_cert}); no site can connect either.",
            where=address,
            fix="run `medfed server rotate-ca --config server.toml`, then `medfed server "
            "rotate-ca --finish --config server.toml`, and send every site the new "
            "ca/ca-bundle.pem for its site.federation_ca",
        )
    if problem is TlsProblem.NOT_YET_VALID:
        return MedfedError(
            f"{head}: {d.detail}.",
            where=address,
            fix="set the clocks of this machine and the server (NTP)",
        )
    if problem is TlsProblem.WRONG_HOST:
        return MedfedError(
            f"{head}: {d.detail}.",
            where=address,
            fix="set superlink.public_host in server.toml to a name the certificate holds, "
            "or dial one of them",
        )
    return MedfedError(
        f"{head} (the CA file {ca_cert} was not accepted).",
        where=address,
        fix="pass the federation's ca/ca.pem (--federation DIR or --ca CA.pem)",
    )


class Control:
    """A connection to one SuperLink's Control API."""

    def __init__(
        self, address: str, ca_cert: Path, credential: CoordinatorCredential | None = None
    ) -> None:
        self.address = address
        self.ca_cert = Path(ca_cert)
        self.credential = credential
        if not Path(ca_cert).exists():
            raise MedfedError(
                "The federation CA certificate is missing.",
                where=str(ca_cert),
                fix="pass --federation DIR (the folder `medfed server init` made) or --ca CA.pem",
            )
        self._client = ControlHttpClient.from_server_address(
            server_address=address,
            insecure=False,
            root_certificates=str(ca_cert),
            interceptors=[
                CliClientHttpInterceptor(),
                RuntimeVersionHttpInterceptor(component_name="flwr CLI"),
                # last: it signs the request as it will be sent
                *([CoordinatorSigner(credential)] if credential else []),
            ],
        )

    def close(self) -> None:
        """Close the HTTP connection."""
        self._client.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, what: str, fn, request):  # noqa: ANN001, ANN202
        try:
            return fn(request)
        except httpx.TransportError as exc:
            raise self._transport_error(what, exc) from None
        except httpx.HTTPStatusError as exc:
            body = exc.response.text[:300]
            if exc.response.status_code == 401 and body.startswith("refused by medfed"):
                raise self._refused(what, body) from None
            raise MedfedError(
                f"The server refused to {what} (HTTP {exc.response.status_code}): {body}",
                where=self.address,
            ) from None

    def _refused(self, what: str, body: str) -> MedfedError:
        """The server's coordinator check said no: who must do what."""
        who = f"coordinator {self.credential.name!r}" if self.credential else "this client"
        return MedfedError(
            f"The server refused to let {who} {what}: {body.removeprefix('refused by medfed: ')}",
            where=self.address,
            fix="use a coordinator credential the federation has registered: `medfed` reads "
            "[coordinator] credential of server.toml, or pass --credential FILE; a "
            "coordinator makes one with `medfed server coordinators add NAME`",
        )

    def _transport_error(self, what: str, exc: httpx.TransportError) -> MedfedError:
        """What went wrong on the way to the server, and who must do what about it."""
        text = str(exc)
        if any(m in text for m in ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed")):
            return tls_error(self.address, self.ca_cert, what=what)
        if isinstance(exc, httpx.ConnectError) and "SSL" not in text:
            return ServerUnreachable(
                f"Cannot reach the medfed server at {self.address} to {what}: nothing answers "
                "there (it is not running, or the address is wrong).",
                where=self.address,
                fix="start it with `medfed server start --config server.toml`, "
                "or check superlink.public_host and superlink.port in server.toml",
            )
        return MedfedError(
            f"The connection to the server at {self.address} failed while trying to {what} "
            f"({type(exc).__name__}{': ' + text if text else ''}).",
            where=self.address,
            fix="check that `medfed server start` runs for this federation at this address "
            "(another program may listen there), read the server's log "
            "(server.toml key state.log_file), and try again",
        )

    def submit(self, run: RunConfig) -> int:
        """Submit a run; returns its run id."""
        fab_bytes = _fab_bytes()
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        run_json = run.to_json()
        signed = {wire.RUN_CONFIG_KEY: run_json}
        if self.credential is not None and (proof := self.credential.sign_run(run_json)):
            signed[wire.RUN_PROOF_KEY] = proof  # each site checks it before it trains
        req = StartRunRequest(fab=fab_to_proto(fab), override_config=user_config_to_proto(signed))
        res = self._call("start a run", self._client.StartRun, req)
        if not res.HasField("run_id"):
            raise MedfedError("The server did not start the run.", where=self.address)
        return int(res.run_id)

    def stop(self, run_id: int) -> bool:
        """Ask the SuperLink to stop a run."""
        res = self._call("stop a run", self._client.StopRun, StopRunRequest(run_id=run_id))
        return bool(res.success)

    def runs(self, run_id: int | None = None) -> list[RunInfo]:
        """Runs known to the SuperLink (all, or one)."""
        req = ListRunsRequest(run_id=run_id) if run_id is not None else ListRunsRequest()
        res = self._call("list runs", self._client.ListRuns, req)
        return [
            RunInfo(
                int(rid),
                r.status.status,
                r.status.sub_status,
                r.status.details,
                r.pending_at,
                r.running_at,
                r.finished_at,
            )
            for rid, r in res.run_dict.items()
        ]

    def register_node(self, public_key_pem: bytes, name: str) -> int:
        """Register a site's public key; returns the node id."""
        res = self._call(
            "enrol a site",
            self._client.RegisterNode,
            RegisterNodeRequest(public_key=public_key_pem, name=name),
        )
        return int(res.node_id)

    def nodes(self) -> list[dict[str, object]]:
        """Registered nodes with their status and the times of their last heartbeat."""
        res = self._call("list sites", self._client.ListNodes, ListNodesRequest())
        out = []
        for n in res.nodes_info:
            out.append(
                {
                    "node_id": int(n.node_id),
                    "status": n.status,
                    "name": getattr(n, "name", ""),
                    "public_key": bytes(n.public_key),
                    # when it was last heard from (the dashboard's "last seen")
                    "last_activated_at": n.last_activated_at,
                    "last_deactivated_at": n.last_deactivated_at,
                    "online_until": float(n.online_until),
                    "heartbeat_interval": float(n.heartbeat_interval),
                }
            )
        return out
