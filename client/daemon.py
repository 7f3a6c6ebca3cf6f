"""`medfed site start`: the site daemon = a Flower SuperNode + the warm site worker.

The worker runs in this process (it keeps torch, the model, the decoded data and
the GPU context warm); the SuperNode is a child process whose per-message
ClientApps relay to the worker over a Unix socket.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flwr.common.constant import HEARTBEAT_DEFAULT_INTERVAL, HEARTBEAT_PATIENCE

from medfed.client.executor import InProcessExecutor
from medfed.client.worker import SiteWorker, bind
from medfed.core import wire
from medfed.core.config import SiteConfig, load_toml, resolve
from medfed.core.errors import IdentityError, MedfedError, ProcessError
from medfed.core.flower_env import flower_env
from medfed.core.identity import check_certificate_valid, load_certificate
from medfed.core.procs import Managed, require_free_port, wait_for_port

log = logging.getLogger("medfed.site")

DEFAULT_POLL_INTERVAL = 0.2  # seconds between SuperNode polls when idle (Flower: 3 s)
#: A site that stopped without signing off (it crashed, or the server went down before
#: it) stays "online" at the SuperLink until its heartbeats' patience runs out, and the
#: SuperLink refuses to activate it again until then, with the same error as an unknown
#: key. For that long a refused activation is retried before it is called "not enrolled"
#: (``MEDFED_ACTIVATION_PATIENCE_S`` sets another span, e.g. 0 to fail at once).
ACTIVATION_PATIENCE_S = float(os.environ.get(
    "MEDFED_ACTIVATION_PATIENCE_S", HEARTBEAT_PATIENCE * HEARTBEAT_DEFAULT_INTERVAL + 15.0))
ACTIVATION_RETRY_S = 5.0


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

    def path(self, relative: str) -> Path:
        """Resolve a site.toml path."""
        return resolve(self.config_path, relative)

    @property
    def name(self) -> str:
        """The site's name."""
        return self.config.site.name

    def check(self) -> None:
        """Fail early, with the fix, on a missing key, a bad CA or a taken port."""
        s = self.config.site
        ca = self.path(s.federation_ca)
        check_certificate_valid(load_certificate(ca),
                                where=f"{ca} (site.toml key site.federation_ca)")
        if not self.path(s.private_key).exists():
            raise IdentityError(
                "The site's private key is missing.",
                where=f"{self.path(s.private_key)} (site.toml key site.private_key)",
                fix="restore it, or create a new site with `medfed site init` and enrol it again",
            )
        require_free_port("127.0.0.1", s.runtime_port, what="SuperNode runtime API",
                          key=f"{self.config_path} key site.runtime_port")

    def supernode_process(self) -> Managed:
        """The SuperNode as a managed process (not started yet)."""
        s = self.config.site
        node_config = (f'{wire.NODE_WORKER_SOCKET}="{self.path(s.worker_socket)}" '
                       f'{wire.NODE_SITE_NAME}="{s.name}"')
        argv = [
            sys.executable, "-m", "medfed.client.supernode_launcher",
            "--superlink", s.server,
            "--root-certificates", str(self.path(s.federation_ca)),
            "--auth-supernode-private-key", str(self.path(s.private_key)),
            "--node-config", node_config,
            "--port", str(s.runtime_port),
            "--isolation", "process",  # ClientApp tasks run in this daemon (InProcessExecutor)
        ]
        env = {**flower_env(self.path("state/flwr_home")),
               "MEDFED_POLL_INTERVAL": str(self.poll_interval)}
        return Managed(f"SuperNode of site {s.name}", argv, self.path("logs/supernode.log"),
                       env=env)

    def start(self) -> None:
        """Start the worker (in a thread of this process) and the SuperNode."""
        self.check()
        self.worker = SiteWorker(self.config, self.config_path)
        self._server = bind(self.worker, self.path(self.config.site.worker_socket))
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.2}, daemon=True,
                                        name="medfed-worker")
        self._thread.start()
        self.worker.audit.record("daemon-started", site=self.name, device=str(self.worker.device))
        self.supernode = self.supernode_process().start()
        # The executor dials the SuperNode's runtime API; dialling before it listens only
        # fills the console with refused connections. If it never listens, wait() reports why.
        wait_for_port("127.0.0.1", self.config.site.runtime_port, timeout=60,
                      alive=self.supernode.alive)
        from medfed.client.app import app as client_app

        self.executor = InProcessExecutor(f"127.0.0.1:{self.config.site.runtime_port}", client_app)
        self.executor.start()

    def wait(self, *, stop: threading.Event | None = None) -> None:
        """Block until the SuperNode ends (or ``stop`` is set); raise a clear error on failure.

        A refused activation is retried for :data:`ACTIVATION_PATIENCE_S` (the server may
        still count this site's last connection as live) before it is reported.
        """
        assert self.supernode is not None
        started = time.monotonic()
        while True:
            while self.supernode.alive():
                if stop is not None and stop.wait(0.5):
                    return
                if stop is None:
                    time.sleep(0.5)
                self._check_log()
            if not self._activation_refused() \
                    or time.monotonic() - started > ACTIVATION_PATIENCE_S:
                raise self.failure()
            log.warning("the server at %s did not accept site %r yet: it may still count the "
                        "site's last connection as live (up to %.0f s after a crash or a server "
                        "restart); retrying in %.0f s", self.config.site.server, self.name,
                        ACTIVATION_PATIENCE_S, ACTIVATION_RETRY_S)
            if stop is not None and stop.wait(ACTIVATION_RETRY_S):
                return
            if stop is None:
                time.sleep(ACTIVATION_RETRY_S)
            self.supernode.stop()  # exited; closes its log
            self.supernode = self.supernode_process().start()

    def _activation_refused(self) -> bool:
        assert self.supernode is not None
        # flower-supernode logs its exit code 305, but the OS reports it modulo 256
        return "Failed to activate SuperNode" in self.supernode.log_of_this_start()

    def _check_log(self) -> None:
        assert self.supernode is not None
        tail = self.supernode.log_tail(40)
        if "CERTIFICATE_VERIFY_FAILED" in tail:
            self.supernode.stop()
            raise IdentityError(
                "The server's TLS certificate is not signed by the federation CA this site pins "
                "(or it has expired).",
                where=f"{self.path(self.config.site.federation_ca)} (site.toml site.federation_ca)",
                fix="get the federation's ca.pem from the coordinator; check the server address",
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
                f"{ACTIVATION_PATIENCE_S:.0f} s, longer than the server keeps a lost "
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
                    f"program using it (`ss -ltnp | grep :{port}`)")
        return ProcessError(
            f"The SuperNode of site {self.name!r} stopped (exit code {code}).",
            where=str(self.supernode.log_path), fix="read its log; last lines:\n" + tail,
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
