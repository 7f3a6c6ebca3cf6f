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


def test_a_second_start_that_fails_keeps_the_running_daemons_worker_socket(
        short_tmp: Path) -> None:
    CertificateAuthority.create("fed").save(short_tmp / "ca.pem", short_tmp / "ca.key")
    port = free_port()
    config = init_site(short_tmp / "s", name="s", federation_ca=short_tmp / "ca.pem",
                       runtime_port=port)
    first = SiteDaemon(config)
    sock_path = first.path(first.config.site.worker_socket)
    sock_path.parent.mkdir(parents=True, exist_ok=True)
    # The running daemon: its SuperNode holds the runtime port, its worker the socket.
    with socket.socket() as supernode, \
            socketserver.UnixStreamServer(str(sock_path), socketserver.BaseRequestHandler):
        supernode.bind(("127.0.0.1", port))
        supernode.listen()
        second = SiteDaemon(config)
        with pytest.raises(MedfedError, match="already in use"):
            second.start()
        second.stop()  # what `medfed site start` does on its way out
        assert sock_path.exists()
