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


class Control:
    """A connection to one SuperLink's Control API."""

    def __init__(self, address: str, ca_cert: Path) -> None:
        self.address = address
        if not Path(ca_cert).exists():
            raise MedfedError(
                "The federation CA certificate is missing.", where=str(ca_cert),
                fix="pass --federation DIR (the folder `medfed server init` made) or --ca CA.pem",
            )
        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=False, root_certificates=str(ca_cert),
            interceptors=[CliClientHttpInterceptor(),
                          RuntimeVersionHttpInterceptor(component_name="flwr CLI")],
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
        except httpx.ConnectError as exc:
            text = str(exc)
            if "CERTIFICATE_VERIFY_FAILED" in text:
                raise MedfedError(
                    f"The server at {self.address} presented a certificate this CA does not "
                    "trust (or that has expired).",
                    where=self.address, expected="a certificate issued by the federation CA",
                    fix="use the ca.pem of this federation; if it expired, run "
                    "`medfed server renew-cert`",
                ) from None
            raise ServerUnreachable(
                f"Cannot reach the medfed server at {self.address} to {what}: {exc}",
                where=self.address,
                fix="start it with `medfed server start --config server.toml`, "
                "or check the address",
            ) from None
        except httpx.HTTPStatusError as exc:
            body = exc.response.text[:300]
            raise MedfedError(
                f"The server refused to {what} (HTTP {exc.response.status_code}): {body}",
                where=self.address,
            ) from None

    def submit(self, run: RunConfig) -> int:
        """Submit a run; returns its run id."""
        fab_bytes = _fab_bytes()
        fab = Fab(hashlib.sha256(fab_bytes).hexdigest(), fab_bytes, {})
        req = StartRunRequest(
            fab=fab_to_proto(fab),
            override_config=user_config_to_proto({wire.RUN_CONFIG_KEY: run.to_json()}),
        )
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
            RunInfo(int(rid), r.status.status, r.status.sub_status, r.status.details,
                    r.pending_at, r.running_at, r.finished_at)
            for rid, r in res.run_dict.items()
        ]

    def register_node(self, public_key_pem: bytes, name: str) -> int:
        """Register a site's public key; returns the node id."""
        res = self._call("enrol a site", self._client.RegisterNode,
                         RegisterNodeRequest(public_key=public_key_pem, name=name))
        return int(res.node_id)

    def nodes(self) -> list[dict[str, object]]:
        """Registered nodes with their status."""
        res = self._call("list sites", self._client.ListNodes, ListNodesRequest())
        out = []
        for n in res.nodes_info:
            out.append({"node_id": int(n.node_id), "status": n.status,
                        "name": getattr(n, "name", ""),
                        "public_key": bytes(n.public_key)})
        return out
