"""Starting and stopping the processes medfed runs (SuperLink, SuperNodes, workers).

Each child gets its own process group, so stopping it also stops what it spawned
(ServerApp and ClientApp subprocesses). Stopping is idempotent and escalates
from SIGTERM to SIGKILL.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from medfed.core.errors import ProcessError


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on ``host:port`` (or the port cannot be bound)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


#: Where :func:`free_port` looks when the OS's ephemeral range is known: this many
#: ports just below it (never below 1024).
LISTEN_SPAN = 10_000
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


def ephemeral_range(source: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int] | None:
    """The ports the OS gives outgoing connections (Linux), or None where unknown."""
    try:
        low, high = (int(v) for v in source.read_text().split())
    except (OSError, ValueError):
        return None
    return low, high


def free_port(host: str = "127.0.0.1", *, ephemeral: tuple[int, int] | None = None) -> int:
    """A port that is free now and that outgoing connections will not take.

    A port picked now is listened on later (a site daemon's SuperNode starts seconds
    after its folder is written). A port from the OS's ephemeral range (what binding
    port 0 returns) can meanwhile become the local end of any outgoing connection on
    the machine, and the listener then fails with "already in use". So the port is
    drawn at random from the :data:`LISTEN_SPAN` ports below that range, which the OS
    never hands out on its own; where the range is unknown, the OS picks.
    """
    span = ephemeral or ephemeral_range()
    if span is not None:
        below = range(max(1024, span[0] - LISTEN_SPAN), span[0])
        for port in random.SystemRandom().sample(below, min(200, len(below))):
            if not port_in_use(host, port):
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def require_free_port(host: str, port: int, *, what: str, key: str) -> None:
    """Fail with a clear message if ``port`` is taken."""
    if port_in_use(host, port):
        raise ProcessError(
            f"Port {port} on {host} is already in use, so the {what} cannot listen there.",
            where=key,
            fix=f"stop the process using it (`ss -ltnp | grep :{port}`) or change {key}",
        )


def wait_for_port(host: str, port: int, *, timeout: float, alive: Callable[[], bool]) -> bool:
    """Wait until something accepts connections on ``host:port``; False on timeout or death."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            return False
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.1)
    return False


@dataclass
class RestartBackoff:
    """How long to wait before restarting a child that stopped: exponential, capped.

    The first restart waits ``initial`` seconds, each further one twice as long, up to
    ``cap``; a child that stayed up ``stable_after`` seconds or more starts again from
    ``initial`` (it was not crash-looping).
    """

    initial: float = 1.0
    cap: float = 60.0
    stable_after: float = 300.0
    restarts: int = 0  # restarts in the current streak
    _next: float = field(default=0.0, repr=False)

    def delay(self, uptime: float) -> float:
        """Seconds to wait before restarting a child that ran for ``uptime`` seconds."""
        if uptime >= self.stable_after or self.restarts == 0:
            self._next, self.restarts = self.initial, 0
        delay = self._next
        self._next = min(self._next * 2, self.cap)
        self.restarts += 1
        return delay


@dataclass
class Managed:
    """A child process in its own process group, logging to a file."""

    name: str
    argv: Sequence[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    proc: subprocess.Popen[bytes] | None = None
    _log: IO[bytes] | None = None
    _log_start: int = 0  # where this start's output begins in the (appended) log
    started_at: float = 0.0  # time.monotonic() of the last start
    _read_to: int = 0  # how far new_output() has read
    on_stop: Callable[[], None] | None = None  # called by stop(), after the group ended
    #: The kernel kills the child when this process dies (Linux): for programs that are
    #: not medfed's own and so cannot watch their parent (Orthanc).
    die_with_parent: bool = False

    def start(self) -> Managed:
        """Start the process; its stdout and stderr go to ``log_path``."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self._log_start = self._read_to = self._log.tell()
        self.proc = subprocess.Popen(
            list(self.argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **self.env},
            cwd=self.cwd,
            start_new_session=True,
            preexec_fn=_kill_with_parent if self.die_with_parent else None,
        )
        self.started_at = time.monotonic()
        return self

    def uptime(self) -> float:
        """Seconds since the last start (0 if never started)."""
        return time.monotonic() - self.started_at if self.proc is not None else 0.0

    def alive(self) -> bool:
        """True while the process runs."""
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the process's log, for error messages."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def log_of_this_start(self) -> str:
        """What the process wrote since it was last started (the log is appended to)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def new_output(self) -> str:
        """What the process wrote since the last call (or since it started)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._read_to)
                data = f.read()
        except FileNotFoundError:
            return ""
        end = data.rfind(b"\n") + 1  # whole lines only; the rest comes next time
        self._read_to += end
        return data[:end].decode("utf-8", errors="replace")

    def stop(self, *, grace: float = 5.0) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after ``grace`` seconds."""
        if self.proc is not None:
            pgid = self.proc.pid  # start_new_session: the group id is the child's pid
            for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
                # the leader is gone; make sure nothing in its group lingers
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                break
        if self._log is not None:
            self._log.close()
            self._log = None
        if self.on_stop is not None:
            self.on_stop()


def _kill_with_parent() -> None:
    """In the child before exec: SIGKILL it when the parent dies (prctl PR_SET_PDEATHSIG)."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: stop() still ends it
        pass


class ProcessGroup:
    """Processes started together and stopped together (in reverse order)."""

    def __init__(self) -> None:
        self.members: list[Managed] = []

    def start(self, proc: Managed) -> Managed:
        """Start ``proc`` and remember it for :meth:`stop_all`."""
        self.members.append(proc.start())
        return proc

    def stop_all(self) -> None:
        """Stop every member, last started first."""
        for proc in reversed(self.members):
            proc.stop()
        self.members.clear()

    def check_alive(self) -> None:
        """Raise if a member died, with the tail of its log."""
        for proc in self.members:
            if not proc.alive():
                raise ProcessError(
                    f"The {proc.name} stopped unexpectedly "
                    f"(exit code {proc.proc.returncode if proc.proc else '?'}).",
                    where=str(proc.log_path),
                    fix="read the log above; last lines:\n" + proc.log_tail(),
                )

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()
