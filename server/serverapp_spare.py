"""ServerApp processes started before a run needs them, their imports already done.

Flower's SuperExec starts a new ``flwr-serverapp`` process for every run; importing
medfed's ServerApp (torch, MONAI, Opacus) takes 5-8 s of a 2-core machine. After a
SuperLink crash that wait sat between the restart and the resumed run's first round.

So the process that runs the SuperLink (``medfed server start``, or a local
federation) keeps a *spare* (:class:`SparePool`): a process of its own, in its own
session, that listens on a Unix socket in the server's ``state/spares`` folder while
it imports the ServerApp, and runs Flower's stock ``flwr-serverapp`` entry point with
the arguments the SuperExec hands it (:func:`hand_over`,
:mod:`medfed.server.superexec_launcher`). The pool starts the next spare when one is
taken. A spare belongs to the pool's process, not to the SuperLink, so a SuperLink
that crashes and is started again finds it warm. Without a spare that takes a run,
the SuperExec starts ``flwr-serverapp`` as Flower does.

Usage (by :class:`SparePool`): ``python -m medfed.server.serverapp_spare SOCKET``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from medfed.core.heap import with_model_buffers
from medfed.core.parent_watch import exit_when
from medfed.core.procs import RestartBackoff

log = logging.getLogger("medfed.server")

#: The folder of the spares' sockets (set for the SuperLink and its SuperExec).
SPARES_ENV = "MEDFED_SERVERAPP_SPARES"
TAKEN = b"taken\n"
SOCKET_SUFFIX = ".sock"
TAKEN_SUFFIX = ".taken"  # a spare's socket, renamed once it took a run
BINDING_SUFFIX = ".b"  # a spare's socket until it listens (then renamed to its name)
MAX_SOCKET_PATH = 100  # AF_UNIX paths are limited to 107 bytes on Linux


class SparePool:
    """Keeps one idle spare ServerApp, a child of this process, listening in ``folder``.

    ``env`` is the environment the SuperLink runs with (the spare becomes a run's
    ServerApp). :meth:`stop` ends the idle spare; a taken one is a run's ServerApp
    and ends with its SuperExec, as Flower's would.
    """

    def __init__(
        self,
        folder: Path,
        env: dict[str, str],
        *,
        log_path: Path | None = None,
        check_every: float = 0.5,
    ) -> None:
        self.folder = folder
        self.env = env
        self.log_path = log_path  # where a ServerApp writes (the SuperLink's log)
        self.check_every = check_every
        self.started = 0  # spares started so far
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket: Path | None = None
        self._bound = False
        self._taken: list[subprocess.Popen[bytes]] = []  # spares now running a ServerApp
        self._backoff = RestartBackoff()
        self._not_before = 0.0  # no new spare before this time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self) -> SparePool:
        """Start a spare now and keep one from now on (idempotent)."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in [
            *self.folder.glob("*" + SOCKET_SUFFIX),  # of a crashed predecessor
            *self.folder.glob("*" + TAKEN_SUFFIX),
            *self.folder.glob("*" + BINDING_SUFFIX),
        ]:
            with contextlib.suppress(OSError):
                stale.unlink()
        self.replenish()
        self._thread = threading.Thread(target=self._loop, name="medfed-spares", daemon=True)
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.check_every):
            try:
                self.replenish()
            except OSError as exc:  # e.g. out of processes: runs start cold meanwhile
                log.warning("could not start a spare ServerApp (%s); retrying", exc)

    def replenish(self) -> None:
        """Start a new spare if the last one was taken or is gone."""
        with self._lock:
            self._taken = [p for p in self._taken if p.poll() is None]  # reaps ended runs
            if self._stop.is_set() or self._idle() or time.monotonic() < self._not_before:
                return
            if self._proc is not None and self._proc.poll() is not None and not self._bound:
                # it died before it could take a run (a broken install, say): back off
                self._not_before = time.monotonic() + self._backoff.delay(0.0)
                log.warning(
                    "a spare ServerApp ended at its start (exit %s); the next in "
                    "%.0f s, runs start cold meanwhile",
                    self._proc.returncode,
                    self._not_before - time.monotonic(),
                )
                self._proc = None
                return
            if self._proc is not None:
                self._taken.append(self._proc)
            self._socket = self.folder / f"{secrets.token_hex(6)}{SOCKET_SUFFIX}"
            self._bound = False
            out = None
            if self.log_path is not None:
                self.log_path.parent.mkdir(parents=True, exist_ok=True)
                out = open(self.log_path, "ab")  # noqa: SIM115
            try:
                self._proc = subprocess.Popen(
                    [sys.executable, "-m", "medfed.server.serverapp_spare", str(self._socket)],
                    env=with_model_buffers({**os.environ, **self.env}),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT if out else None,
                    start_new_session=True,  # as Flower starts a ServerApp
                )
            finally:
                if out is not None:
                    out.close()  # the child has its own copy
            self.started += 1

    def _idle(self) -> bool:
        """Whether the current spare still waits for a run (or is about to)."""
        if self._proc is None or self._socket is None or self._proc.poll() is not None:
            return False
        if self._socket.exists():
            self._bound = True
            return True
        taken = self._socket.with_name(self._socket.name + TAKEN_SUFFIX)
        if taken.exists():
            with contextlib.suppress(OSError):
                taken.unlink()
            return False
        return not self._bound  # not bound yet: about to wait for a run

    def stop(self) -> None:
        """Stop keeping a spare; end the idle one."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
        with self._lock:
            if self._proc is not None and self._idle():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._proc.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self._proc.wait(5.0)
            if self._socket is not None:
                with contextlib.suppress(OSError):
                    self._socket.unlink()


_pools: dict[Path, SparePool] = {}


def spare_pool(folder: Path, env: dict[str, str], log_path: Path | None = None) -> SparePool:
    """The pool of this process for ``folder`` (one per federation), started."""
    folder = folder.resolve()
    if len(str(folder)) + 20 > MAX_SOCKET_PATH:
        raise OSError(f"the spares folder {folder} is too long a path for a Unix socket")
    pool = _pools.get(folder)
    if pool is None:
        pool = _pools[folder] = SparePool(folder, env)
    pool.env, pool.log_path = env, log_path
    return pool.start()


def hand_over(folder: str, argv: list[str], *, timeout: float = 15.0) -> bool:
    """Give ``argv`` (flwr-serverapp's arguments) to a spare in ``folder``; True if taken.

    ``timeout`` allows for a spare still importing torch on a loaded machine (it
    answered within 0.25 s here with three busy loops beside it); a cold start would
    take longer than any wait for it.
    """
    for path in sorted(Path(folder).glob("*" + SOCKET_SUFFIX), key=_mtime):
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                conn.connect(str(path))
                conn.sendall(json.dumps(argv).encode() + b"\n")
                if conn.makefile("rb").readline() == TAKEN:
                    return True
        except ConnectionRefusedError:  # its spare is gone
            with contextlib.suppress(OSError):
                path.unlink()
        except OSError:
            continue
    return False


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _warm_up() -> None:
    """Import what the ServerApp needs, so that a run starts without waiting for it."""
    from flwr.superlink.cli import flwr_serverapp  # noqa: F401

    import medfed.server.app  # noqa: F401  (torch, MONAI, Opacus, the strategies)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _parent_pid(argv: list[str]) -> int | None:
    """The ``--parent-pid`` (the SuperExec) that flwr-serverapp is given."""
    if "--parent-pid" in argv[:-1]:
        with contextlib.suppress(ValueError):
            return int(argv[argv.index("--parent-pid") + 1])
    return None


def _wait_for_run(path: str) -> list[str]:
    """Accept the hand-over of one run's arguments on ``path``; confirm it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        # The socket appears under its name only once it listens: a hand-over that
        # connected between bind and listen was refused and took the spare for gone.
        binding = path + BINDING_SUFFIX
        server.bind(binding)
        server.listen(4)
        os.rename(binding, path)
        while True:
            conn, _ = server.accept()
            with conn:
                try:
                    argv = json.loads(conn.makefile("rb").readline())
                    os.rename(path, path + TAKEN_SUFFIX)  # no second run; the pool sees it
                    conn.sendall(TAKEN)
                except (OSError, ValueError):
                    continue
            return [str(a) for a in argv]


def main(path: str) -> int:
    """Wait (warming up) for a run, then be its ``flwr-serverapp``."""
    owner = os.getppid()
    taken = threading.Event()

    def owner_alive() -> bool:  # an idle spare nobody can hand a run to ends
        return taken.is_set() or os.getppid() == owner

    exit_when(owner_alive, grace=0.0)
    warm = threading.Thread(target=_warm_up, name="medfed-spare-warm-up", daemon=True)
    warm.start()
    argv = _wait_for_run(path)
    taken.set()
    superexec = _parent_pid(argv)
    if superexec is not None:  # a ServerApp ends with its SuperExec (and so its SuperLink)
        exit_when(lambda: _alive(superexec))
    warm.join()
    from flwr.superlink.cli import flwr_serverapp

    sys.argv = ["flwr-serverapp", *argv]
    return int(flwr_serverapp() or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
