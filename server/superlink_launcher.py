"""Run Flower's SuperLink so that it ends when `medfed server start` (its parent) ends.

It also serves a renewed TLS certificate without a restart: Flower 1.42 serves every
API (Fleet, Control, Runtime) from one uvicorn server whose TLS context reads the
certificate once, at start. Here that context checks, at most once a second and
during a handshake, whether the certificate or key file was replaced (`medfed server
renew-cert`, `rotate-ca --finish`) and hands each new handshake a context loaded
from the new files. Connections already open keep theirs; a run in progress goes on.
And it starts Flower's SuperExec again should it stop (:func:`supervise_superexec`),
forgets the site connections of the SuperLink's last life (:mod:`.stale_nodes`),
keeps message payloads in memory, not in its database (:func:`keep_payloads_in_memory`),
lets only registered coordinators use the Control API (:func:`gate_control_api`), and
lets model bytes skip the middleware layers that have nothing to do for them
(:mod:`medfed.server.flower_middleware`).

Usage: ``python -m medfed.server.superlink_launcher [flower-superlink args]``.
"""

from __future__ import annotations

import logging
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from medfed.core.parent_watch import watch_parent
from medfed.server.flower_middleware import bypass_idle_middleware
from medfed.server.stale_nodes import database_arg, mark_nodes_offline

log = logging.getLogger("flwr")  # the SuperLink's own log


def _signature(paths: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    out = []
    for path in paths:
        try:
            st = path.stat()
        except OSError:
            out.append((0, 0, 0))
        else:
            out.append((st.st_ino, st.st_mtime_ns, st.st_size))
    return tuple(out)


class CertificateReloader:
    """Hands each TLS handshake a context built from the current certificate files.

    ``build`` makes a server context from the files; ``files`` are the certificate and
    key. Install :meth:`sni_callback` on the context the server listens with (OpenSSL
    calls it for every handshake, with or without a server name).
    """

    def __init__(
        self,
        build: Callable[[], ssl.SSLContext],
        files: tuple[Path, ...],
        *,
        check_every: float = 0.0,
    ) -> None:
        self.build = build
        self.files = files
        self.check_every = check_every
        self.context = build()
        self.reloads = 0
        self._seen = _signature(files)
        self._checked = time.monotonic()
        self._lock = threading.Lock()

    def current(self) -> ssl.SSLContext:
        """The context of the files as they are now (the previous one if they don't load)."""
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.check_every:
                return self.context
            self._checked = now
            seen = _signature(self.files)
            if seen == self._seen:
                return self.context
            try:
                context = self.build()
            except (OSError, ssl.SSLError) as exc:  # half replaced: try again in a second
                log.warning(
                    "medfed: the renewed TLS certificate did not load yet (%s); "
                    "serving the previous one",
                    exc,
                )
                return self.context
            self.context, self._seen = context, seen
            self.reloads += 1
            log.info("medfed: serving the renewed TLS certificate %s", self.files[0])
            return context

    def sni_callback(
        self, ssl_object: Any, server_name: str | None, context: ssl.SSLContext
    ) -> None:
        """Switch a handshake to the current context (Python's ``sni_callback`` protocol)."""
        current = self.current()
        if current is not context:
            ssl_object.context = current


def reload_certificates_on_change() -> None:
    """Make uvicorn's TLS context follow replaced certificate files (see the module doc)."""
    import uvicorn.config

    original = uvicorn.config.create_ssl_context

    def create_ssl_context(
        certfile: Any, keyfile: Any, *args: Any, **kwargs: Any
    ) -> ssl.SSLContext:
        def build() -> ssl.SSLContext:
            return original(certfile, keyfile, *args, **kwargs)

        files = tuple(Path(f) for f in (certfile, keyfile) if f)
        reloader = CertificateReloader(build, files)
        listening = reloader.context
        listening.sni_callback = reloader.sni_callback
        return listening

    if getattr(original, "__name__", "") != "create_ssl_context":
        log.warning("medfed: uvicorn changed; a renewed certificate needs a server restart")
        return
    uvicorn.config.create_ssl_context = create_ssl_context  # type: ignore[assignment]


def supervise_superexec() -> None:
    """Start the SuperLink's SuperExec (it launches each run's ServerApp) again if it stops.

    Flower starts it once; it ends on its first TLS failure with the SuperLink (an
    expired certificate, say), and no run could start after the renewal until the
    server was restarted. Here it is started again, with a back-off, while the
    SuperLink runs.
    """
    import importlib

    from medfed.core.procs import RestartBackoff

    # (the package exports a function of the module's name: import the module itself)
    module = importlib.import_module("flwr.superlink.cli.flower_superlink")

    lifespan = getattr(module, "SuperLinkLifespan", None)
    original = getattr(lifespan, "_start_superexec_if_needed", None)
    if original is None:
        log.warning("medfed: Flower changed; a stopped SuperExec needs a server restart")
        return

    def start(self: Any) -> None:
        original(self)
        if self.superexec_process is not None:
            threading.Thread(
                target=_watch, args=(self,), daemon=True, name="medfed-superexec-watch"
            ).start()

    def _watch(self: Any) -> None:
        backoff, proc, since = RestartBackoff(cap=30.0), self.superexec_process, time.monotonic()
        while True:
            time.sleep(1.0)
            if self.superexec_process is not proc:  # the SuperLink is stopping
                return
            if proc.poll() is None:
                continue
            delay = backoff.delay(time.monotonic() - since)
            log.warning(
                "medfed: the SuperExec stopped (exit code %s); starting it again in %.0f s",
                proc.returncode,
                delay,
            )
            time.sleep(delay)
            if self.superexec_process is not proc:
                return
            original(self)
            proc, since = self.superexec_process, time.monotonic()

    lifespan._start_superexec_if_needed = start


def launch_superexec_with_spares() -> None:
    """Start medfed's SuperExec launcher in place of ``flower-superexec``.

    It hands each run's ServerApp to a warm spare process when the server keeps one
    (:mod:`medfed.server.superexec_launcher`, :mod:`medfed.server.serverapp_spare`).
    """
    import importlib

    module = importlib.import_module("flwr.superlink.cli.flower_superlink")
    original = getattr(module, "_get_superexec_command", None)
    if original is None:
        log.warning("medfed: Flower changed; each ServerApp starts cold")
        return

    def command(*args: Any, **kwargs: Any) -> list[str]:
        stock = list(original(*args, **kwargs))
        if stock[:1] != ["flower-superexec"]:
            log.warning("medfed: Flower's SuperExec command changed; ServerApps start cold")
            return stock
        return [sys.executable, "-m", "medfed.server.superexec_launcher", *stock[1:]]

    module._get_superexec_command = command


def keep_payloads_in_memory() -> None:
    """Keep messages' payloads (model arrays) in memory; the link state stays in the database.

    Flower 1.42 stores every object of every message (each 5 MB chunk of each model
    sent or received) in the SQLite database when the SuperLink has one: at real model
    sizes most of a round goes into writing and reading those blobs. Nothing a restart
    needs is in them: after a SuperLink crash, medfed resumes a run from its checkpoint
    and sends that round again (:mod:`medfed.server.resume`), so payloads of messages
    in flight are never read again. Runs, nodes and messages stay in the database.
    """
    import importlib

    from flwr.supercore.object_store import ObjectStoreFactory

    module = importlib.import_module("flwr.superlink.config_loader")
    if getattr(module, "ObjectStoreFactory", None) is not ObjectStoreFactory:
        log.warning("medfed: Flower changed; message payloads stay in its database")
        return

    def in_memory(database: str = "") -> ObjectStoreFactory:
        return ObjectStoreFactory()  # Flower's in-memory object store

    module.ObjectStoreFactory = in_memory


def gate_control_api() -> None:
    """Put :class:`~medfed.server.coordinators.ControlGate` in front of every API.

    Flower builds its app's middleware from ``flwr.superlink.extensions.get_middleware``
    (outermost first); the gate goes first, so no Control API request reaches Flower
    without a registered coordinator's signature. No registry in the environment:
    every Control API request is refused.
    """
    import os

    from flwr.superlink import extensions
    from starlette.middleware import Middleware

    from medfed.server.coordinators import AUDIT_ENV, REGISTRY_ENV, SOURCES_ENV, ControlGate

    gate = Middleware(
        ControlGate,
        registry=os.environ.get(REGISTRY_ENV, ""),
        audit=os.environ.get(AUDIT_ENV, ""),
        control_from=os.environ.get(SOURCES_ENV, '["this-host"]'),
    )
    stock = extensions.get_middleware
    extensions.get_middleware = lambda: (gate, *stock())


def main() -> int:
    """Watch the parent, follow certificate renewals, run the stock flower-superlink."""
    watch_parent()
    gate_control_api()
    keep_payloads_in_memory()
    reload_certificates_on_change()
    supervise_superexec()
    launch_superexec_with_spares()
    bypass_idle_middleware()
    if (database := database_arg(sys.argv[1:])) is not None:
        mark_nodes_offline(database)
    from flwr.superlink.cli import flower_superlink

    sys.argv[0] = "flower-superlink"
    return int(flower_superlink() or 0)


if __name__ == "__main__":
    sys.exit(main())
