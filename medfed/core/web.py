"""Serving a read-only dashboard: the bind rule, the login token, TLS and the vendored files.

Both dashboards (the coordinator's, :mod:`medfed.server.dashboard`, and the site's,
:mod:`medfed.client.site_dashboard`) are a page and a few JSON endpoints served by
the standard library's ``ThreadingHTTPServer``: no web framework, no build step, no
request leaves the machine (uPlot, the chart library, is vendored in ``web_static/``
with its licence).

Who can read it. On loopback (the default) only this machine's users can. Bound to
another address, a dashboard shows a federation's state to a network, so it needs both
TLS (``--tls-cert``/``--tls-key``) and a login token: :func:`check_bind` refuses
anything less, with the fix. With a token every request must carry it (an
``Authorization: Bearer`` header, or the cookie that ``?token=`` or the login form
sets once); it is compared in constant time.

Read-only: GET (and HEAD) only; every other method is answered 405.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.cookies import SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

from medfed.core.errors import ConfigError

log = logging.getLogger("medfed.web")

COOKIE = "medfed_dashboard"
#: Where a dashboard's login token may come from instead of ``--token-file``.
TOKEN_ENV = "MEDFED_DASHBOARD_TOKEN"
#: The vendored front-end files a page may load (``/static/NAME``).
STATIC_TYPES = {
    "uPlot.iife.min.js": "text/javascript; charset=utf-8",
    "uPlot.min.css": "text/css; charset=utf-8",
    "uPlot.LICENSE": "text/plain; charset=utf-8",
    "federation.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}
_HEADERS = {
    # nothing but this server: no CDN, no inline script
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Bind:
    """Where a dashboard listens and how it is protected."""

    host: str = "127.0.0.1"
    port: int = 8470
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token: str | None = None

    @property
    def tls(self) -> bool:
        """Whether it serves HTTPS."""
        return self.tls_cert is not None

    def url(self, port: int | None = None) -> str:
        """The address to open in a browser."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{port or self.port}/"


def read_token(token_file: Path | None) -> str | None:
    """The login token: the first line of ``token_file``, else $MEDFED_DASHBOARD_TOKEN.

    Never a command-line value: every user of the machine can read those (ps).
    """
    if token_file is not None:
        try:
            lines = Path(token_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ConfigError(
                f"The dashboard's token file cannot be read: {exc.strerror or exc}.",
                where=str(token_file),
                fix="pass a readable file holding the token on its first line",
            ) from None
        if not lines or not lines[0].strip():  # asked for a login, got none: fail closed
            raise ConfigError(
                "The dashboard's token file holds no token on its first line.",
                where=str(token_file),
                fix='write one there: python -c "import secrets; print(secrets.token_urlsafe(24))"',
            )
        return lines[0].strip()
    return os.environ.get(TOKEN_ENV) or None


def check_bind(bind: Bind, *, where: str) -> None:
    """Refuse a dashboard that a network could read without TLS and a token."""
    if (bind.tls_cert is None) != (bind.tls_key is None):
        raise ConfigError(
            "A dashboard with TLS needs both a certificate and its key.",
            where=where,
            expected="--tls-cert CERT.pem together with --tls-key KEY.pem",
            fix="pass both, or neither (loopback only)",
        )
    for path in (bind.tls_cert, bind.tls_key):
        if path is not None and not Path(path).is_file():
            raise ConfigError(
                "A TLS file of the dashboard is missing.",
                where=str(path),
                fix="pass the path of an existing PEM file",
            )
    if bind.token is not None and len(bind.token) < 16:
        raise ConfigError(
            "The dashboard's login token is too short to guess-proof it.",
            where=where,
            expected="at least 16 characters",
            fix='make one with: python -c "import secrets; print(secrets.token_urlsafe(24))"',
        )
    if is_loopback(bind.host):
        return
    missing = [
        what
        for what, ok in (
            ("TLS (--tls-cert, --tls-key)", bind.tls),
            ("a login token (--token-file)", bind.token),
        )
        if not ok
    ]
    if missing:
        raise ConfigError(
            f"The dashboard would show the federation's state on {bind.host}, reachable "
            f"from the network, without {' and '.join(missing)}.",
            where=where,
            expected="127.0.0.1 (the default), or TLS and a login token when bound elsewhere",
            fix="bind to 127.0.0.1 (and reach it through an SSH tunnel), or pass --tls-cert "
            f"CERT.pem --tls-key KEY.pem --token-file FILE (or set {TOKEN_ENV})",
        )


@dataclass
class Response:
    """What a route answers."""

    body: bytes
    content_type: str = "text/html; charset=utf-8"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any) -> Response:
        """A JSON body."""
        return cls(json.dumps(value, separators=(",", ":")).encode(), "application/json")

    @classmethod
    def text(cls, text: str, status: int) -> Response:
        """A plain-text answer (an error)."""
        return cls(text.encode(), "text/plain; charset=utf-8", status)


#: A dashboard's routes: (path, query) -> its answer, or None for "not found".
App = Callable[[str, dict[str, str]], Response | None]


def static_file(name: str) -> Response | None:
    """A vendored front-end file, or None for a name that is not one."""
    if name not in STATIC_TYPES:
        return None
    body = files("medfed.core").joinpath("web_static", name).read_bytes()
    return Response(body, STATIC_TYPES[name], headers={"Cache-Control": "max-age=3600"})


def _login_page(path: str, wrong: bool) -> bytes:
    note = "<p class=bad>That token is not this dashboard's.</p>" if wrong else ""
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>medfed dashboard: login"
        "</title><link rel=stylesheet href=/static/dashboard.css></head><body>"
        f"<h1>medfed dashboard</h1>{note}<form method=get action='{path}'>"
        "<label>token <input type=password name=token autofocus></label> "
        "<button>open</button></form></body></html>"
    ).encode()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, response: Response, *, head: bool = False) -> None:
        self.send_response(response.status)
        for name, value in {**_HEADERS, **response.headers}.items():
            self.send_header(name, value)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.end_headers()
        if not head:
            self.wfile.write(response.body)

    def _authorized(self, query: dict[str, str]) -> bool | None:
        """True: let in; False: a wrong token was given; None: none was given."""
        token = self.server.token
        if token is None:
            return True
        given = []
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            given.append(auth[7:])
        cookie = SimpleCookie(self.headers.get("Cookie", ""))
        if COOKIE in cookie:
            given.append(cookie[COOKIE].value)
        if "token" in query:
            given.append(query["token"])
        if not given:
            return None
        return any(hmac.compare_digest(g.encode(), token.encode()) for g in given)

    def do_GET(self, head: bool = False) -> None:  # noqa: N802 - http.server's name
        url = urlsplit(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path.startswith("/static/"):  # the vendored files hold no federation data
            response = static_file(path.removeprefix("/static/"))
            self._send(response or Response.text("not found", 404), head=head)
            return
        allowed = self._authorized(query)
        if not allowed:
            page = _login_page(path, wrong=allowed is False)
            self._send(Response(page, status=HTTPStatus.UNAUTHORIZED), head=head)
            return
        token = self.server.token
        # Once: then the cookie. Only the query's own token, checked (never echo another).
        if token is not None and hmac.compare_digest(
            query.get("token", "").encode(), token.encode()
        ):
            rest = urlencode({k: v for k, v in query.items() if k != "token"})
            secure = "; Secure" if self.server.tls else ""
            self._send(
                Response(
                    b"",
                    status=HTTPStatus.SEE_OTHER,
                    headers={
                        "Location": path + (f"?{rest}" if rest else ""),
                        "Set-Cookie": f"{COOKIE}={query['token']}; HttpOnly; "
                        f"SameSite=Strict; Path=/{secure}",
                    },
                ),
                head=head,
            )
            return
        try:
            response = self.server.app(path, query)
        except Exception:  # a broken page must not take the server down
            log.exception("dashboard page %s failed", path)
            response = Response.text("the dashboard failed to read this page; see its log", 500)
        self._send(response or Response.text("not found", 404), head=head)

    def do_HEAD(self) -> None:  # noqa: N802
        self.do_GET(head=True)

    def _read_only(self) -> None:
        self._send(Response.text("read-only: GET only", HTTPStatus.METHOD_NOT_ALLOWED))

    do_POST = do_PUT = do_DELETE = do_PATCH = _read_only  # noqa: N815


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, bind: Bind, app: App) -> None:
        self.app = app
        self.token = bind.token
        self.tls = bind.tls
        self._tls: ssl.SSLContext | None = None
        if bind.tls:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls.load_cert_chain(str(bind.tls_cert), str(bind.tls_key))
        super().__init__((bind.host, bind.port), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        """TLS handshake in the request's own thread: a slow client stalls no one else."""
        if self._tls is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(30.0)
        tls = self._tls.wrap_socket(request, server_side=True)  # takes over the socket
        try:
            super().finish_request(tls, client_address)
        finally:
            self.shutdown_request(tls)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that broke off (or spoke plain HTTP to HTTPS): a debug line, no traceback."""
        log.debug("dashboard request from %s failed", client_address, exc_info=True)


@dataclass
class Dashboard:
    """A dashboard server; :meth:`serve_forever` or :meth:`start` (a thread, for tests)."""

    bind: Bind
    app: App
    where: str = "dashboard"
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    def open(self) -> Dashboard:
        """Check the bind rule and listen (port 0: a free one)."""
        check_bind(self.bind, where=self.where)
        try:
            self._server = _Server(self.bind, self.app)
        except OSError as exc:
            raise ConfigError(
                f"The dashboard cannot listen on {self.bind.host}:{self.bind.port}: "
                f"{exc.strerror or exc}.",
                where=self.where,
                fix="pick another --port, or stop what listens there",
            ) from None
        return self

    @property
    def port(self) -> int:
        """The port it listens on."""
        assert self._server is not None, "call open() first"
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """Its address."""
        return self.bind.url(self.port)

    def serve_forever(self) -> None:
        """Serve until interrupted."""
        assert self._server is not None, "call open() first"
        try:
            self._server.serve_forever(poll_interval=0.2)
        finally:
            self._server.server_close()

    def start(self) -> Dashboard:
        """Open and serve in a daemon thread."""
        if self._server is None:
            self.open()
        self._thread = threading.Thread(target=self.serve_forever, daemon=True, name="dashboard")
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving."""
        if self._server is not None:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> Dashboard:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
