"""The site daemon's start-up checks leave a daemon already running on the site alone."""

from __future__ import annotations

import socket
import socketserver
from pathlib import Path

import pytest

from medfed.client.daemon import SiteDaemon
from medfed.client.site import init_site
from medfed.core.errors import MedfedError
from medfed.core.identity import CertificateAuthority
from medfed.core.procs import free_port


def test_a_second_start_that_fails_keeps_the_running_daemons_worker_socket(short_tmp: Path) -> None:
    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    port = free_port()
    config = init_site(
        short_tmp / "s", name="s", federation_ca=short_tmp / "ca.pem", runtime_port=port
    )
    first = SiteDaemon(config)
    sock_path = first.path(first.config.site.worker_socket)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    # The running daemon: its SuperNode holds the runtime port, its worker the socket.
    with (
        socket.socket() as supernode,
        socketserver.UnixStreamServer(str(sock_path), socketserver.BaseRequestHandler),
    ):
        supernode.bind(("127.0.0.1", port))
        supernode.listen()
        second = SiteDaemon(config)
        with pytest.raises(MedfedError, match="already in use"):
            second.start()
        second.stop()  # what `medfed site start` does on its way out
        assert sock_path.exists()


def test_a_supernode_that_lost_its_runtime_port_says_which_key_to_change(short_tmp: Path) -> None:
    from types import SimpleNamespace

    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    config = init_site(
        short_tmp / "s", name="s", federation_ca=short_tmp / "ca.pem", runtime_port=9311
    )
    daemon = SiteDaemon(config)
    # What flower-supernode logs when another daemon bound the port after check() passed.
    log = (
        "INFO:     Application startup complete.\nERROR:    [Errno 98] error while "
        "attempting to bind on address ('127.0.0.1', 9311): address already in use\n"
        + "Traceback (most recent call last):\n  ...\n" * 8
        + "RuntimeError: SuperNode Runtime HTTP API failed to start."
    )
    daemon.supernode = SimpleNamespace(  # type: ignore[assignment]
        proc=SimpleNamespace(returncode=1),
        log_path=short_tmp / "supernode.log",
        log_tail=lambda lines=20: "\n".join(log.splitlines()[-lines:]),
        log_of_this_start=lambda: log,
    )
    error = daemon.failure()
    assert "could not listen on its runtime port 9311" in str(error)
    assert error.where.endswith("key site.runtime_port")


def test_a_refused_activation_is_retried_while_the_server_may_hold_the_last_connection(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a crash or a server restart the SuperLink counts the site online for up to a
    minute and refuses to activate it again, exactly as for an unknown key: retry."""
    import sys
    import threading
    import time

    from medfed.client import daemon as daemon_module
    from medfed.core.procs import Managed

    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    config = init_site(
        short_tmp / "s", name="s", federation_ca=short_tmp / "ca.pem", runtime_port=free_port()
    )
    daemon = SiteDaemon(config)
    monkeypatch.setattr(daemon_module, "ACTIVATION_RETRY_S", 0.1)
    starts: list[int] = []

    def supernode() -> Managed:  # refused once (flower-supernode's exit 305), then connected
        starts.append(len(starts))
        code = (
            "print('Failed to activate SuperNode.'); raise SystemExit(305)"
            if len(starts) == 1
            else "import time; time.sleep(60)"
        )
        return Managed("fake SuperNode", [sys.executable, "-c", code], short_tmp / "sn.log")

    monkeypatch.setattr(daemon, "supernode_process", supernode)
    daemon.supernode = daemon.supernode_process().start()
    stop = threading.Event()
    waiting = threading.Thread(target=daemon.wait, kwargs={"stop": stop})
    waiting.start()
    try:
        deadline = time.monotonic() + 30
        while not (len(starts) == 2 and daemon.supernode.alive()):
            assert time.monotonic() < deadline, "the refused SuperNode was not restarted"
            time.sleep(0.1)
        assert waiting.is_alive()  # still serving, no error raised
    finally:
        stop.set()
        waiting.join(timeout=10)
        daemon.supernode.stop()
    # past the patience, the same refusal is reported as an unknown key, with the fix
    monkeypatch.setattr(daemon_module, "ACTIVATION_PATIENCE_S", 0.0)
    starts.clear()
    daemon.supernode = daemon.supernode_process().start()
    with pytest.raises(MedfedError, match="not enrolled"):
        daemon.wait()
