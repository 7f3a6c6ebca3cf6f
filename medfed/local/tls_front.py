"""A TLS-terminating front for a local HTTP server, as a hospital's reverse proxy would be.

Debian's Orthanc 1.10 (civetweb built against OpenSSL 3) dies on its first TLS
connection, and hospitals usually put a PACS's DICOMweb behind a proxy anyway: the
local PACS therefore listens on plain HTTP on loopback and this front speaks TLS
to the clients, forwarding the bytes both ways. With ``client_ca`` it also asks each
client for a certificate signed by that CA (mutual TLS, as many hospitals' proxies
do). Loopback only; for tests and the demo.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
from pathlib import Path

_CHUNK = 1 << 16


class TlsFront:
    """Accept TLS on ``127.0.0.1:port`` and relay each connection to ``127.0.0.1:upstream``."""

    def __init__(
        self,
        upstream: int,
        cert_pem: Path,
        key_pem: Path,
        port: int = 0,
        *,
        client_ca: Path | None = None,
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(cert_pem, key_pem)
        if client_ca is not None:  # no certificate from that CA: the handshake fails
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=client_ca)
        front = self

        class Relay(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                front._relay(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

            def get_request(self) -> tuple[socket.socket, object]:
                raw, address = self.socket.accept()
                raw.settimeout(30)
                return context.wrap_socket(
                    raw, server_side=True, do_handshake_on_connect=False
                ), address

        self.upstream = upstream
        self._server = Server(("127.0.0.1", port), Relay)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(
            target=self._server.serve_forever, daemon=True, name="tls-front"
        )

    def start(self) -> TlsFront:
        """Serve in a background thread."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close the listening socket."""
        self._server.shutdown()
        self._server.server_close()

    def _relay(self, client: ssl.SSLSocket) -> None:
        try:
            client.do_handshake()  # an untrusting client ends here: nothing is forwarded
        except (ssl.SSLError, OSError):
            _close_after_alert(client)
            return
        try:
            up = socket.create_connection(("127.0.0.1", self.upstream), timeout=30)
        except OSError:  # the server behind is gone: the client sees the connection end
            client.close()
            return
        with client, up:
            back = threading.Thread(target=_pump, args=(up, client), daemon=True)
            back.start()
            _pump(client, up)
            back.join(timeout=30)


def _close_after_alert(client: ssl.SSLSocket) -> None:
    """Close a connection whose handshake failed so that the client reads why.

    The TLS alert (e.g. "certificate required") is already sent; closing with the
    client's request still unread would reset the connection, and the client would
    see a bare EOF instead of the alert. So: end our side, drain briefly, then close
    (a lingering close, as web servers do). The raw socket's calls bypass TLS.
    """
    try:
        socket.socket.shutdown(client, socket.SHUT_WR)
        client.settimeout(1.0)
        while socket.socket.recv(client, _CHUNK):
            pass
    except OSError:
        pass
    finally:
        client.close()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    """Copy until ``source`` ends, then end ``sink``.

    The upstream gets a half-close (HTTP); the TLS connection is shut down whole, which
    also wakes the thread reading it (a close alone would not, and the client would wait
    for the socket's timeout).
    """
    try:
        while data := source.recv(_CHUNK):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        try:
            sink.shutdown(socket.SHUT_RDWR if isinstance(sink, ssl.SSLSocket) else socket.SHUT_WR)
        except OSError:
            pass
