"""`medfed site start`: the site daemon = a Flower SuperNode + the warm site worker.

The worker runs in this process (it keeps torch, the model, the decoded data and
the GPU context warm); the SuperNode is a child process whose per-message
ClientApps relay to the worker over a Unix socket.

The daemon supervises both. A SuperNode that stops is started again after a back-off
(1 s doubling to 60 s, :class:`~medfed.core.procs.RestartBackoff`), whatever the
reason: killed, crashed, cut off by a TLS certificate the site cannot verify (said
once, with who must do what; the pinned CA file is read again at each start, so a new
one needs no restart). The worker's thread is started again should it stop, and the
in-process executor outlives a SuperNode restart (:class:`InProcessExecutor`). Only a
configuration error that no restart can fix ends the daemon (exit status 2): a key the
server does not know (after :data:`ACTIVATION_PATIENCE_S`), a missing or unreadable
key, a malformed server address.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from medfed.client.executor import InProcessExecutor
from medfed.client.tls_advice import tls_advice
from medfed.client.worker import SiteWorker, bind
from medfed.core import wire
from medfed.core.config import SiteConfig, load_toml, resolve
from medfed.core.errors import ConfigError, IdentityError, MedfedError, ProcessError
from medfed.core.flower_env import flower_env
from medfed.core.identity import TlsProblem, diagnose_tls, load_certificates
from medfed.core.procs import Managed, RestartBackoff, require_free_port, wait_for_port
from medfed.core.secagg import fingerprint

log = logging.getLogger("medfed.site")

DEFAULT_POLL_INTERVAL = 0.2  # seconds between SuperNode polls when idle (Flower: 3 s)
#: A site that stopped without signing off (it crashed, or the server went down before
#: it) stays "online" at the SuperLink until its heartbeats' patience runs out, and the
#: SuperLink refuses to activate it again until then, with the same error as an unknown
#: key. For that long a refused activation is retried before it is called "not enrolled"
#: (``MEDFED_ACTIVATION_PATIENCE_S`` sets another span, e.g. 0 to fail at once).
ACTIVATION_PATIENCE_S = float(
    os.environ.get(
        "MEDFED_ACTIVATION_PATIENCE_S", HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0
    )
)
ACTIVATION_RETRY_S = 5.0
#: The longest wait between two restarts of a SuperNode that keeps stopping
#: (``MEDFED_RESTART_MAX_S`` sets another, e.g. a few seconds in tests).
RESTART_MAX_S = float(os.environ.get("MEDFED_RESTART_MAX_S", 60.0))
#: What flower-supernode writes when TLS with the server failed.
TLS_MARKERS = ("CERTIFICATE_VERIFY_FAILED", "certificate verify failed", "SSL/TLS handshake error")
#: flower-supernode exit codes (its log's "Exit Code: N") for a configuration that no
#: restart fixes: the site's key unreadable, the server address malformed.
CONFIG_EXIT_CODES = {
    302: "the site's private key could not be loaded",
    600: "the server address in site.toml cannot be parsed",
}


@dataclass
class SiteDaemon:
    """One site's daemon, built from its site.toml."""

    config_path: Path
    poll_interval: float = DEFAULT_POLL_INTERVAL

    def __post_init__(self) -> None:
        self.config_path = Path(self.config_path).resolve()
        self.config: SiteConfig = load_toml(self.config_path, SiteConfig)
        self.worker: SiteWorker | None = None
        self.supernode: Managed | None = None
        self._server = None
        self._thread: threading.Thread | None = None
        self.executor: InProcessExecutor | None = None
        self.supervision = _Supervision(RestartBackoff(cap=RESTART_MAX_S))

    def path(self, relative: str) -> Path:
        """Resolve a site.toml path."""
        return resolve(self.config_path, relative)

    @property
    def name(self) -> str:
        """The site's name."""
        return self.config.site.name

    @property
    def activation_patience_s(self) -> float:
        """How long a refused activation is retried.

        :data:`ACTIVATION_PATIENCE_S`, or longer when this site declares a heartbeat
        interval above Flower's 30 s (its last connection then stays "online" longer).
        """
        if "MEDFED_ACTIVATION_PATIENCE_S" in os.environ:
            return ACTIVATION_PATIENCE_S
        extra = HEARTBEAT_PATIENCE * (
            self.config.site.heartbeat_interval_s - HEARTBEAT_DEFAULT_INTERVAL
        )
        return ACTIVATION_PATIENCE_S + max(0.0, extra)

    def check(self) -> None:
        """Fail early, with the fix, on a missing key, a bad CA or a taken port."""
        s = self.config.site
        # Missing or not a certificate: a configuration error. Expired: not fatal (the
        # coordinator must send a new one, which is picked up without a restart).
        load_certificates(self.path(s.federation_ca))
        if not self.path(s.private_key).exists():
            raise self._missing_key()
        from medfed.data import check_source_available

        check_source_available(self.config_path, self.config.data)  # e.g. a missing DICOM folder
        require_free_port(
            "127.0.0.1",
            s.runtime_port,
            what="SuperNode runtime API",
            key=f"{self.config_path} key site.runtime_port",
        )

    def supernode_process(self) -> Managed:
        """The SuperNode as a managed process (not started yet)."""
        s = self.config.site
        node_config = (
            f'{wire.NODE_WORKER_SOCKET}="{self.path(s.worker_socket)}" '
            f'{wire.NODE_SITE_NAME}="{s.name}"'
        )
        argv = [
            sys.executable,
            "-m",
            "medfed.client.supernode_launcher",
            "--superlink",
            s.server,
            "--root-certificates",
            str(self.path(s.federation_ca)),
            "--auth-supernode-private-key",
            str(self.path(s.private_key)),
            "--node-config",
            node_config,
            "--port",
            str(s.runtime_port),
            "--isolation",
            "process",  # ClientApp tasks run in this daemon (InProcessExecutor)
        ]
        env = {
            **flower_env(self.path("state/flwr_home")),
            "MEDFED_POLL_INTERVAL": str(self.poll_interval),
            "MEDFED_HEARTBEAT_INTERVAL": str(s.heartbeat_interval_s),
        }
        return Managed(
            f"SuperNode of site {s.name}", argv, self.path("logs/supernode.log"), env=env
        )

    def start(self) -> None:
        """Start the worker (in a thread of this process) and the SuperNode."""
        self.check()
        self.worker = SiteWorker(self.config, self.config_path, verify_identities=True)
        # a site made before identities were enrolled gets keys/secagg-identity.pub here,
        # to send to the coordinator (its peers mask only with a certified key)
        identity = self.worker.secure.identity
        self._server = bind(self.worker, self.path(self.config.site.worker_socket))
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name="medfed-worker",
        )
        self._thread.start()
        self.worker.audit.record(
            "daemon-started",
            site=self.name,
            device=str(self.worker.device),
            secagg_identity=fingerprint(identity.public_bytes),
        )
        self.worker.privacy.check_at_start()  # a ledger the audit log disowns refuses DP rounds
        self.supernode = self.supernode_process().start()
        # The executor dials the SuperNode's runtime API; dialling before it listens only
        # fills the console with refused connections. If it never listens, wait() reports why.
        wait_for_port(
            "127.0.0.1", self.config.site.runtime_port, timeout=60, alive=self.supernode.alive
        )
        from medfed.client.app import app as client_app

        self.executor = InProcessExecutor(f"127.0.0.1:{self.config.site.runtime_port}", client_app)
        self.executor.start()

    def wait(self, *, stop: threading.Event | None = None) -> None:
        """Supervise the SuperNode and the worker until ``stop`` is set (or forever).

        A SuperNode that stopped is started again after a back-off; raises only for a
        configuration error a restart cannot fix (see the module doc).
        """
        assert self.supernode is not None
        stop = stop or threading.Event()
        while not stop.wait(0.5):
            self._keep_worker_alive()
            if self.supernode.alive():
                self._watch_running()
                continue
            delay = self._after_exit()  # raises for a configuration error
            if stop.wait(delay):
                return
            self.supernode.stop()  # exited; closes its log
            self.supernode = self.supernode_process().start()

    def _keep_worker_alive(self) -> None:
        """Serve the worker's socket again if its thread died (it never should)."""
        if self._server is None or self._thread is None or self._thread.is_alive():
            return
        log.error("the worker of site %r stopped serving; starting it again", self.name)
        self._record("worker-restarted")
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name="medfed-worker",
        )
        self._thread.start()

    def _watch_running(self) -> None:
        """Note a (re)connection; stop a SuperNode stuck failing TLS so that it is redone."""
        assert self.supernode is not None
        since = self.supernode.new_output()
        sup = self.supervision
        if "SuperNode ID:" in since and not sup.connected:
            sup.connected = True
            sup.refused_since = None
            if sup.reported:
                log.warning(
                    "site %r is connected to the server at %s again",
                    self.name,
                    self.config.site.server,
                )
                sup.reported.clear()
        if any(m in since for m in TLS_MARKERS):
            sup.tls_seen = sup.tls_seen or time.monotonic()
        if sup.tls_seen and time.monotonic() - sup.tls_seen > 5:  # it should have ended
            self.supernode.stop()

    def _after_exit(self) -> float:
        """Explain why the SuperNode stopped; the seconds to wait before starting it again.

        Raises the error of a configuration that no restart fixes.
        """
        assert self.supernode is not None
        sup = self.supervision
        text = self.supernode.log_of_this_start()
        uptime = self.supernode.uptime()
        sup.connected, sup.tls_seen = False, 0.0
        code = _flower_exit_code(text)
        if code in CONFIG_EXIT_CODES:
            raise self._config_failure(code)
        if not self.path(self.config.site.private_key).exists():
            raise self._missing_key()
        node_id = _node_id(text)
        if self._activation_refused():
            now = time.monotonic()
            first, sup.refused_since = sup.refused_since is None, sup.refused_since or now
            if now - sup.refused_since >= self.activation_patience_s:
                raise self.failure()
            if first and sup.node_id is not None:
                # the server may still hold the place of this daemon's last SuperNode (it
                # lost its connection without signing off): free it, once per streak (a
                # second daemon with this key would not be pushed off again and again)
                self._release_node(sup.node_id)
            log.warning(
                "the server at %s did not accept site %r yet: it may still count the "
                "site's last connection as live (up to %.0f s after a crash or a server "
                "restart); retrying in %.0f s",
                self.config.site.server,
                self.name,
                self.activation_patience_s,
                ACTIVATION_RETRY_S,
            )
            return ACTIVATION_RETRY_S
        sup.refused_since = None
        delay = sup.backoff.delay(uptime)
        if any(m in text for m in TLS_MARKERS):
            reason = self._explain_tls(text)
        else:
            reason = self._explain_exit(text)
            if node_id is not None:  # it was in: free its place at the server at once
                self._release_node(node_id)
        sup.node_id = node_id if node_id is not None else sup.node_id
        log.warning(
            "restarting the SuperNode of site %r in %.0f s (restart %d in a row): %s",
            self.name,
            delay,
            sup.backoff.restarts,
            reason,
        )
        if sup.backoff.restarts == 1 or reason != sup.audited:  # once per streak and reason
            sup.audited = reason
            self._record(
                "supernode-restarted",
                reason=reason,
                delay_s=delay,
                restarts_in_a_row=sup.backoff.restarts,
            )
        return delay

    def _explain_exit(self, text: str) -> str:
        """A short reason for a SuperNode exit other than TLS or a refused activation."""
        assert self.supernode is not None and self.supernode.proc is not None
        code = self.supernode.proc.returncode
        port = self.config.site.runtime_port
        if f"{port}): address already in use" in text:
            error = self.failure()
            self._report_once("port", f"{error.what}\n  fix: {error.fix}; the site keeps retrying")
            return f"runtime port {port} taken"
        if code is not None and code < 0:
            return f"it was killed (signal {-code})"
        return f"it stopped (exit code {code}; its log: {self.supernode.log_path})"

    def _explain_tls(self, text: str) -> str:
        """Classify a TLS failure, say once who must do what; a short reason."""
        s = self.config.site
        ca = self.path(s.federation_ca)
        diagnosis = diagnose_tls(s.server, ca)
        if diagnosis is None:  # e.g. a new CA bundle was saved since the SuperNode started
            return "TLS failed, but the pinned CA file now accepts the server's certificate"
        if diagnosis.problem is TlsProblem.NO_CERTIFICATE:
            return "TLS failed, and no server answers now"
        self._report_once(
            diagnosis.problem.name, tls_advice(diagnosis, server=s.server, ca_path=ca)
        )
        return diagnosis.problem.value

    def _report_once(self, key: str, message: str) -> None:
        """Log ``message`` the first time ``key`` happens since the site last connected."""
        if key in self.supervision.reported:
            return
        self.supervision.reported.add(key)
        log.error("%s", message)

    def _record(self, event: str, **fields: object) -> None:
        if self.worker is not None:
            self.worker.audit.record(event, site=self.name, **fields)

    def _release_node(self, node_id: int) -> None:
        """Deactivate this site's dead SuperNode at the server.

        Its successor is then let in at once, not after the server's heartbeat patience
        (about a minute).

        Signed with the site's key, like the SuperNode's own sign-off; best effort.
        """
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key
        from flwr.proto.fleet_pb2 import DeactivateNodeRequest  # pylint: disable=E0611
        from flwr.supercore.interceptors.http.runtime_version import (
            RuntimeVersionHttpInterceptor,
        )
        from flwr.supernode.fleet_http_client import FleetHttpClient
        from flwr.supernode.node_auth_http_interceptor import NodeAuthHttpInterceptor

        s = self.config.site
        try:
            key = load_ssh_private_key(self.path(s.private_key).read_bytes(), password=None)
            with FleetHttpClient.from_server_address(
                s.server,
                False,
                str(self.path(s.federation_ca)),
                interceptors=[
                    RuntimeVersionHttpInterceptor(component_name="SuperNode"),
                    NodeAuthHttpInterceptor(key, key.public_key()),
                ],
            ) as client:
                client.DeactivateNode(DeactivateNodeRequest(node_id=node_id))
        except Exception as exc:  # noqa: BLE001 - the server then frees it after its patience
            log.info("could not sign off the stopped SuperNode %s: %s", node_id, exc)

    def _activation_refused(self) -> bool:
        assert self.supernode is not None
        # flower-supernode logs its exit code 305, but the OS reports it modulo 256
        return "Failed to activate SuperNode" in self.supernode.log_of_this_start()

    def _config_failure(self, code: int) -> MedfedError:
        s = self.config.site
        if code == 302:
            return IdentityError(
                f"The SuperNode of site {self.name!r} could not load the site's private key "
                f"({CONFIG_EXIT_CODES[code]}).",
                where=f"{self.path(s.private_key)} (site.toml key site.private_key)",
                expected="the OpenSSH private key `medfed site init` wrote",
                fix="restore it from backup, or create a new site with `medfed site init` and "
                "enrol it again",
            )
        return ConfigError(
            f"The SuperNode of site {self.name!r} stopped: {CONFIG_EXIT_CODES[code]}.",
            where=f"{self.config_path} key site.server",
            expected="HOST:PORT",
            fix="set the server's address as the coordinator gave it, then start the site",
        )

    def _missing_key(self) -> MedfedError:
        s = self.config.site
        return IdentityError(
            "The site's private key is missing.",
            where=f"{self.path(s.private_key)} (site.toml key site.private_key)",
            fix="restore it, or create a new site with `medfed site init` and enrol it again",
        )

    def failure(self) -> MedfedError:
        """Explain why the SuperNode stopped."""
        assert self.supernode is not None and self.supernode.proc is not None
        code = self.supernode.proc.returncode
        tail = self.supernode.log_tail(15)
        if self._activation_refused():
            return IdentityError(
                f"The server at {self.config.site.server} refused site {self.name!r}: "
                f"its key is not enrolled in this federation (retried for "
                f"{self.activation_patience_s:.0f} s, longer than the server keeps a lost "
                "connection).",
                where=str(self.path(self.config.site.public_key)),
                fix="send this public key to the coordinator, who runs "
                f"`medfed server enrol {self.config.site.public_key} --name {self.name}`; "
                "then start the site again",
            )
        port = self.config.site.runtime_port
        if f"{port}): address already in use" in self.supernode.log_tail(60):
            # Passed check() but lost the race for the port: two site daemons on one
            # machine started together with the same runtime_port (site init's default).
            return ProcessError(
                f"The SuperNode of site {self.name!r} could not listen on its runtime port "
                f"{port}: another program took it first (another site daemon on this "
                "machine?).",
                where=f"{self.config_path} key site.runtime_port",
                fix="give each site daemon on a machine its own runtime_port, or stop the "
                f"program using it (`ss -ltnp | grep :{port}`)",
            )
        return ProcessError(
            f"The SuperNode of site {self.name!r} stopped (exit code {code}).",
            where=str(self.supernode.log_path),
            fix="read its log; last lines:\n" + tail,
        )

    def stop(self) -> None:
        """Stop the executor, the SuperNode and the worker; remove the socket."""
        if self.executor is not None:
            self.executor.stop()
        if self.supernode is not None:
            self.supernode.stop()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
            # Only the daemon that bound the socket removes it: a second `medfed site
            # start` that fails its checks must not cut a running daemon off its worker.
            self.path(self.config.site.worker_socket).unlink(missing_ok=True)
        if self.worker is not None:
            self.worker.audit.record("daemon-stopped", site=self.name)


@dataclass
class _Supervision:
    """What the daemon remembers between SuperNode restarts."""

    backoff: RestartBackoff
    connected: bool = False  # the running SuperNode was let in
    refused_since: float | None = None  # first refused activation of the current streak
    node_id: int | None = None  # the node ID the server gave this site's SuperNode
    audited: str = ""  # the reason of the last restart written to the audit log
    tls_seen: float = 0.0  # when the running SuperNode first logged a TLS failure
    reported: set[str] = field(default_factory=set)  # problems said since the last connection


def _flower_exit_code(text: str) -> int | None:
    """The exit code flower-supernode printed last ("Exit Code: N"), if any."""
    codes = re.findall(r"Exit Code: (\d+)", text)
    return int(codes[-1]) if codes else None


def _node_id(text: str) -> int | None:
    """The node ID the server gave the SuperNode (its log's "SuperNode ID: N"), if any."""
    ids = re.findall(r"SuperNode ID: (\d+)", text)
    return int(ids[-1]) if ids else None
