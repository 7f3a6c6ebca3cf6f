"""A PACS that closes a kept-alive connection under a request: a GET is sent again, once.

The server here (loopback) reads each request and, while ``drops`` lasts, closes the
connection without answering, as a PACS or its proxy does when its idle timeout ends
just as the next request arrives.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest
import requests

from medfed.core.config import PacsSection
from medfed.data.dicomweb import pacs_client


class DroppingServer:
    """HTTP on 127.0.0.1: the first ``drops`` requests get no answer, the rest get 200 ``[]``."""

    def __init__(self, drops: int) -> None:
        self.drops, self.requests = drops, []
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := conn.recv(65536)):
                    head += chunk
                self.requests.append(head.split(b" ", 1)[0].decode())
                if len(self.requests) <= self.drops:
                    continue  # closed unanswered
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/dicom+json\r\n"
                    b"Content-Length: 2\r\nConnection: close\r\n\r\n[]"
                )


MakeSession = Callable[[int], tuple[DroppingServer, requests.Session]]


@pytest.fixture
def session_of() -> Iterator[MakeSession]:
    servers: list[DroppingServer] = []

    def make(drops: int) -> tuple[DroppingServer, requests.Session]:
        server = DroppingServer(drops)
        servers.append(server)
        pacs = PacsSection(url=f"http://127.0.0.1:{server.port}/dicom-web", timeout_s=5)
        return server, pacs_client(pacs)._session

    yield make
    for server in servers:
        server.sock.close()


def test_a_get_cut_off_unanswered_is_sent_again_once(session_of: MakeSession) -> None:
    server, session = session_of(drops=1)
    answer = session.get(f"http://127.0.0.1:{server.port}/dicom-web/studies", timeout=5)
    assert answer.status_code == 200 and answer.json() == []
    assert server.requests == ["GET", "GET"]


def test_a_pacs_that_keeps_cutting_off_is_reported_after_the_second_try(
    session_of: MakeSession,
) -> None:
    server, session = session_of(drops=5)
    with pytest.raises(requests.exceptions.ConnectionError, match="without response"):
        session.get(f"http://127.0.0.1:{server.port}/dicom-web/studies", timeout=5)
    assert server.requests == ["GET", "GET"]


def test_a_post_is_never_sent_twice(session_of: MakeSession) -> None:
    server, session = session_of(drops=1)
    with pytest.raises(requests.exceptions.ConnectionError):
        session.post(f"http://127.0.0.1:{server.port}/dicom-web/studies", data=b"x", timeout=5)
    assert server.requests == ["POST"]
