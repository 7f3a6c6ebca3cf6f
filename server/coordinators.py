"""Who may use the SuperLink's Control API: coordinator credentials, their registry, the check.

Flower 1.42 serves the Control API (register a node, start, stop and list runs) on the
same port as the Fleet API the sites use, and checks nothing on it but TLS: anyone with
the federation's public CA certificate could enrol a key of their own or launch runs.
Here every Control API request carries a coordinator's Ed25519 signature over the
method, the path, the time, a nonce and the body's SHA-256; the SuperLink
(:class:`ControlGate`, installed by :mod:`medfed.server.superlink_launcher`) verifies it
against the registry (``coordinators.toml``: one public key per coordinator, revocable)
before Flower sees the request, refuses anything else with HTTP 401 and a reason, and
appends every call, allowed or refused, with who made it, to the control audit log.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w
import tomllib
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from medfed.core.errors import ConfigError, MedfedError
from medfed.core.files import atomic_write
from medfed.core.identity import CertificateAuthority
from medfed.core.key_certs import COORDINATOR_USAGE, certificate_pem
from medfed.core.run_proof import sign_run
from medfed.server.control_sources import SourceFilter

CONTROL_PREFIX = "/v1/control/"
HEADER_NAME = "x-medfed-coordinator"
HEADER_TIME = "x-medfed-time"
HEADER_NONCE = "x-medfed-nonce"
HEADER_SIGNATURE = "x-medfed-signature"
#: How far a request's time may be from the server's clock (also how long nonces are kept).
MAX_SKEW_S = 300.0
#: Environment of the SuperLink process: the registry and the control audit log.
REGISTRY_ENV = "MEDFED_COORDINATORS"
AUDIT_ENV = "MEDFED_CONTROL_AUDIT"
SOURCES_ENV = "MEDFED_CONTROL_FROM"
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class Refused(Exception):
    """A Control API request without a valid coordinator signature; ``str`` says why."""


def signed_message(method: str, path: str, when: str, nonce: str, body: bytes) -> bytes:
    """The bytes a coordinator signs for one request."""
    digest = hashlib.sha256(body).hexdigest()
    return f"medfed-control-v1\n{method.upper()}\n{path}\n{when}\n{nonce}\n{digest}".encode()


@dataclass(frozen=True)
class CoordinatorCredential:
    """A coordinator's name, private key and certificate (``<name>.key``, PEM, mode 600).

    The certificate (issued by the federation CA) lets sites check the runs it signs.
    """

    name: str
    key: Ed25519PrivateKey
    certificate: x509.Certificate | None = None

    @classmethod
    def create(cls, path: Path, name: str, *, ca: CertificateAuthority) -> CoordinatorCredential:
        """Make a key pair, have ``ca`` certify it, write both to ``path`` (never overwrites)."""
        check_name(name)
        if path.exists():
            raise ConfigError(
                "A coordinator credential already exists here.",
                where=str(path),
                fix="choose another file, or use the existing credential",
            )
        return cls._write(path, name, Ed25519PrivateKey.generate(), ca)

    def recertify(self, path: Path, ca: CertificateAuthority) -> CoordinatorCredential:
        """The same key with a certificate of ``ca`` (a rotated CA), written to ``path``."""
        return self._write(path, self.name, self.key, ca)

    @classmethod
    def _write(
        cls, path: Path, name: str, key: Ed25519PrivateKey, ca: CertificateAuthority
    ) -> CoordinatorCredential:
        certificate = ca.issue_key_cert(name, key.public_key(), COORDINATOR_USAGE)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        header = f"# medfed coordinator credential: {name}\n".encode()
        atomic_write(path, header + pem + certificate.public_bytes(serialization.Encoding.PEM))
        os.chmod(path, 0o600)
        return cls(name, key, certificate)

    @classmethod
    def load(cls, path: Path) -> CoordinatorCredential:
        """Read a credential file written by :meth:`create`."""
        try:
            data = Path(path).read_bytes()
        except FileNotFoundError:
            raise ConfigError(
                "The coordinator credential is missing.",
                where=str(path),
                expected="the file `medfed server init` or `medfed server coordinators add` wrote",
                fix="pass --credential FILE, or ask the federation's coordinator for one "
                "(`medfed server coordinators add NAME`)",
            ) from None
        first, _, rest = data.partition(b"\n")
        prefix = b"# medfed coordinator credential: "
        if not first.startswith(prefix):
            raise ConfigError(
                "Not a medfed coordinator credential.",
                where=str(path),
                expected="a file written by `medfed server coordinators add`",
            )
        pem, marker, cert_pem = rest.partition(b"-----BEGIN CERTIFICATE-----")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
            cert = x509.load_pem_x509_certificate(marker + cert_pem) if marker else None
        except ValueError as exc:
            raise ConfigError(
                f"The coordinator credential is damaged ({exc}).", where=str(path)
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("The coordinator credential holds no Ed25519 key.", where=str(path))
        return cls(first[len(prefix) :].decode().strip(), key, cert)

    def sign_run(self, run_json: str) -> str:
        """The proof sites check before training ``run_json`` ("" without a certificate)."""
        if self.certificate is None:
            return ""
        return sign_run(run_json, name=self.name, key=self.key, certificate=self.certificate)

    def certificate_pem(self) -> str:
        """The certificate, PEM ("" without one)."""
        return certificate_pem(self.certificate) if self.certificate is not None else ""

    def public_pem(self) -> str:
        """The public key, PEM (what the registry keeps)."""
        return (
            self.key.public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            .decode()
        )

    def headers(
        self,
        method: str,
        path: str,
        body: bytes,
        *,
        now: float | None = None,
        nonce: str | None = None,
    ) -> dict[str, str]:
        """The headers that authenticate one request."""
        when = f"{time.time() if now is None else now:.3f}"
        nonce = nonce or secrets.token_hex(16)
        signature = self.key.sign(signed_message(method, path, when, nonce, body))
        return {
            HEADER_NAME: self.name,
            HEADER_TIME: when,
            HEADER_NONCE: nonce,
            HEADER_SIGNATURE: base64.b64encode(signature).decode(),
        }


class CoordinatorSigner:
    """A Flower HTTP client interceptor that signs every request with a credential."""

    def __init__(self, credential: CoordinatorCredential) -> None:
        self.credential = credential

    def intercept(self, context: Any, call_next: Callable[[Any], Any]) -> Any:
        """Add the signature headers, then send."""
        request = context.request
        request.headers.update(
            self.credential.headers(request.method, request.url.path, request.content)
        )
        return call_next(context)


def check_name(name: str) -> None:
    """Refuse a coordinator name that is empty or not a plain word."""
    if not name or not set(name) <= _NAME_CHARS or len(name) > 64:
        raise ConfigError(
            f"Not a usable coordinator name: {name!r}.",
            expected="letters, digits, '.', '_' or '-', at most 64",
        )


class CoordinatorRegistry:
    """``coordinators.toml``: each coordinator's public key, when added, when revoked."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._cache: tuple[tuple[int, int], dict[str, dict[str, Any]]] | None = None
        self._keys: dict[str, Ed25519PublicKey] = {}

    def entries(self) -> dict[str, dict[str, Any]]:
        """Coordinators by name (read again whenever the file changes)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return {}
        stamp = (st.st_mtime_ns, st.st_size)
        if self._cache is None or self._cache[0] != stamp:
            try:
                data = tomllib.loads(self.path.read_text(encoding="utf-8"))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
                raise ConfigError(
                    f"The coordinator registry is not valid TOML ({exc}).", where=str(self.path)
                ) from None
            self._cache = (stamp, {c["name"]: c for c in data.get("coordinator", [])})
            self._keys = {}
        return self._cache[1]

    def add(self, name: str, public_pem: str, certificate_pem: str = "") -> None:
        """Register a coordinator's public key and certificate (a revoked name cannot come back).

        The certificate's serial is what a revocation puts on the CA's revocation list.
        """
        self.check_free(name)
        entries = dict(self.entries())
        entries[name] = {
            "name": name,
            "public_key": public_pem,
            "added": _now_text(),
            **({"certificate": certificate_pem} if certificate_pem else {}),
        }
        self._write(entries)

    def revoked_serials(self) -> list[int]:
        """Serials of the revoked coordinators' certificates (those registered with one)."""
        return [
            x509.load_pem_x509_certificate(e["certificate"].encode()).serial_number
            for e in self.entries().values()
            if e.get("revoked") and e.get("certificate")
        ]

    def check_free(self, name: str) -> None:
        """Refuse a malformed name, or one registered before (revoked names stay taken)."""
        check_name(name)
        entry = self.entries().get(name)
        if entry is not None:
            state = "was revoked" if entry.get("revoked") else "exists"
            raise ConfigError(
                f"A coordinator named {name!r} {state}.",
                where=str(self.path),
                fix="choose another name",
            )

    def revoke(self, name: str) -> None:
        """Refuse this coordinator's requests from now on (the entry stays, for the record)."""
        entries = dict(self.entries())
        if name not in entries:
            raise ConfigError(
                f"No coordinator named {name!r}.",
                where=str(self.path),
                expected=", ".join(sorted(entries)) or "a registered name",
            )
        entries[name] = {**entries[name], "revoked": _now_text()}
        self._write(entries)

    def verify(
        self,
        headers: MutableMapping[str, str],
        method: str,
        path: str,
        body: bytes,
        *,
        now: float | None = None,
    ) -> str:
        """The name of the coordinator who signed this request; :class:`Refused` if none did."""
        name = headers.get(HEADER_NAME, "")
        if not name or HEADER_SIGNATURE not in headers:
            raise Refused(
                "no coordinator credential: only the federation's coordinators may "
                "use the Control API (enrol sites, start, stop or list runs)"
            )
        entry = self.entries().get(name)
        if entry is None:
            raise Refused(f"unknown coordinator {name!r}")
        if entry.get("revoked"):
            raise Refused(f"coordinator {name!r} was revoked at {entry['revoked']}")
        when = headers.get(HEADER_TIME, "")
        try:
            skew = abs((time.time() if now is None else now) - float(when))
        except ValueError:
            raise Refused("the request carries no valid time") from None
        if skew > MAX_SKEW_S:
            raise Refused(
                f"the request's time is {skew:.0f} s off the server's clock "
                f"(more than {MAX_SKEW_S:.0f} s: a replay, or a clock to set)"
            )
        try:
            signature = base64.b64decode(headers[HEADER_SIGNATURE], validate=True)
            self._key(name, entry).verify(
                signature, signed_message(method, path, when, headers.get(HEADER_NONCE, ""), body)
            )
        except (InvalidSignature, ValueError):
            raise Refused(f"the signature does not verify for coordinator {name!r}") from None
        return name

    def _key(self, name: str, entry: dict[str, Any]) -> Ed25519PublicKey:
        if name not in self._keys:
            key = serialization.load_pem_public_key(entry["public_key"].encode())
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 key")
            self._keys[name] = key
        return self._keys[name]

    def _write(self, entries: dict[str, dict[str, Any]]) -> None:
        atomic_write(self.path, tomli_w.dumps({"coordinator": list(entries.values())}).encode())


class NonceLedger:
    """Nonces seen within the last ``MAX_SKEW_S`` seconds: a replayed request is refused."""

    def __init__(self) -> None:
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()

    def check(self, nonce: str, now: float) -> None:
        """Record ``nonce``; :class:`Refused` if it was seen (or is missing)."""
        if not nonce:
            raise Refused("the request carries no nonce")
        with self._lock:
            if len(self._seen) > 1000:  # forget those past any valid request time
                cutoff = now - 2 * MAX_SKEW_S
                self._seen = {n: t for n, t in self._seen.items() if t > cutoff}
            if nonce in self._seen:
                raise Refused("this request was already made once (a replay)")
            self._seen[nonce] = now


Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


class ControlGate:
    """ASGI middleware: Control API requests pass only with a valid coordinator signature.

    Other paths (the sites' Fleet API, the runtime API) pass untouched. With no
    registry configured every Control API request is refused (fail closed).
    """

    def __init__(
        self,
        app: Callable[[Scope, Receive, Send], Awaitable[None]],
        *,
        registry: str = "",
        audit: str = "",
        control_from: str = "",
    ) -> None:
        self.app = app
        #: JSON list of admitted sources (server.toml [superlink] control_from); "": any
        self.sources = SourceFilter(json.loads(control_from)) if control_from else None
        self.registry = CoordinatorRegistry(Path(registry)) if registry else None
        self.audit = Path(audit) if audit else None
        self.nonces = NonceLedger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Check a Control API request, record it, then pass it on or refuse it."""
        path = scope.get("path", "")
        if scope.get("type") != "http" or not path.startswith(CONTROL_PREFIX):
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = bool(message.get("more_body", False))
        headers = {
            k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])
        }
        now = time.time()
        try:
            peer = (scope.get("client") or ("", 0))[0]
            if self.sources is not None and (why := self.sources.refusal(peer)):
                raise Refused(why)
            if self.registry is None:
                raise Refused(
                    "the server has no coordinator registry (a medfed SuperLink "
                    "started without it refuses every Control API request)"
                )
            who = self.registry.verify(headers, scope.get("method", ""), path, body, now=now)
            self.nonces.check(headers.get(HEADER_NONCE, ""), now)
        except (Refused, MedfedError) as exc:
            reason = str(exc).splitlines()[0]
            self._record(headers.get(HEADER_NAME, ""), path, scope, allowed=False, reason=reason)
            await _refuse(send, reason)
            return
        self._record(who, path, scope, allowed=True)
        replayed = False

        async def replay() -> MutableMapping[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _record(
        self, who: str, path: str, scope: Scope, *, allowed: bool, reason: str = ""
    ) -> None:
        if self.audit is None:
            return
        client = scope.get("client") or ("", 0)
        entry = {
            "time": _now_text(),
            "coordinator": who,
            "call": path[len(CONTROL_PREFIX) :],
            "allowed": allowed,
            "peer": f"{client[0]}:{client[1]}",
            **({"reason": reason} if reason else {}),
        }
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        self.audit.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.audit, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)


async def _refuse(send: Send, reason: str) -> None:
    body = f"refused by medfed: {reason}".encode()
    await send(
        {
            "type": "http.response.start",
            "status": 401,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _now_text() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
