"""Simulated sites in worker processes: site training on every core, the server alone.

:class:`SiteProcesses` starts ``workers`` processes (``spawn``: a fresh interpreter,
no copy of the parent's threads or torch state), each with its own
:class:`medfed.local.simulation.SitePool` over the same site folders, and talks to
each over a socket pair with the site daemon's own local channel
(:func:`medfed.core.wire.send_frame` / :func:`~medfed.core.wire.recv_frame`): the
frame a process gets is the one a deployed site's worker gets.

A site always goes to the same process (site ``i`` to process ``i % workers``), so a
warm worker is never built twice and a site's requests run in order. Each process
runs one request at a time with ``threads`` torch threads, so ``workers x threads``
matches the cores. A process that dies is started again for the next request; the
request it held gets an error reply naming the site, as a crashed site daemon's would.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medfed.core import wire
from medfed.core.parent_watch import exit_with_parent
from medfed.core.schema import SiteReply
from medfed.local.sim_sites import SimSite

log = logging.getLogger("medfed.simulation")

#: Header key of a request's site index (the process's pool has the same sites).
SITE_KEY = "sim_site"
#: First frame a process gets: its sites, folders, budget and threads.
SETUP_OP = "sim-setup"
#: Operation that ends the run at every site the process served.
END_RUN_OP = "sim-end-run"
#: Requests a process holds at most (one at work, the others waiting or answered).
DEPTH = 3


def default_workers(sites: int) -> int:
    """Worker processes a simulation of ``sites`` sites gets by default.

    One (sites in the calling process) up to the few sites a deployment-like run has;
    beyond, one per core (at most 8): a many-site study is bound by site training.
    """
    from medfed.local.simulation import WARM_SITES_MAX

    if sites <= WARM_SITES_MAX:
        return 1
    return max(1, min(os.cpu_count() or 1, 8, sites))


@dataclass
class _Lane:
    """One worker process and the parent's end of its channel."""

    index: int
    process: subprocess.Popen[bytes] | None = None
    channel: socket.socket | None = None
    lock: threading.Lock = None  # type: ignore[assignment]
    #: Requests handed over whose replies are not collected yet, oldest first.
    posted: deque[Posted] = None  # type: ignore[assignment]
    #: Which process this is (a new one after a crash): older requests were lost with it.
    generation: int = 0

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.posted = deque()


@dataclass
class Posted:
    """A request handed to a site's process, whose reply is not collected yet."""

    lane: _Lane
    index: int
    generation: int = 0
    failure: wire.Frame | None = None  # the error reply, when the request could not be sent


class SiteProcesses:
    """Worker processes that run the simulated sites' requests.

    Parameters
    ----------
    root, sites, keep_warm, budget, policy
        As :class:`medfed.local.simulation.SitePool` (every process builds one).
    workers : int
        Number of processes (>= 1).
    threads : int, optional
        torch threads per process; default: the cores shared out among the processes.
    """

    def __init__(
        self,
        root: Path,
        sites: Sequence[SimSite],
        *,
        workers: int,
        keep_warm: int,
        budget: Mapping[str, Any] | None = None,
        policy: Mapping[str, Any] | None = None,
        threads: int | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._setup = {
            "root": str(root),
            "keep_warm": keep_warm,
            "budget": dict(budget or {}),
            "policy": dict(policy or {}),
            "threads": threads or max(1, (os.cpu_count() or 1) // workers),
            "sites": [
                {"name": s.name, "data": s.data.model_dump(mode="json", exclude_none=True)}
                for s in sites
            ],
        }
        self._names = [s.name for s in sites]
        self._lanes = [_Lane(i) for i in range(workers)]

    @property
    def workers(self) -> int:
        """Number of worker processes."""
        return len(self._lanes)

    def start(self) -> None:
        """Start every process now (otherwise each starts with its first request)."""
        for lane in self._lanes:
            with lane.lock:
                self._ensure(lane)

    def handle(self, index: int, request: wire.Frame) -> wire.Frame:
        """Site ``index``'s reply to ``request`` (blocks while its process is busy)."""
        return self.collect(self.post(index, request))

    def lane_of(self, index: int) -> int:
        """The process that serves site ``index``."""
        return index % len(self._lanes)

    def can_post(self, index: int) -> bool:
        """Whether site ``index``'s process takes another request now (:data:`DEPTH`)."""
        return len(self._lanes[self.lane_of(index)].posted) < DEPTH

    def post(self, index: int, request: wire.Frame) -> Posted:
        """Hand ``request`` to site ``index``'s process; :meth:`collect` takes the reply.

        The process reads requests as they come and answers them in order, each reply
        kept in the process until it is collected: a finished reply waits there, not
        in the caller's memory, while the process goes on with the next request.
        Requests of one process are collected in the order they were posted. One
        caller thread posts and collects.
        """
        lane = self._lanes[self.lane_of(index)]
        frame = wire.Frame({**request.header, SITE_KEY: index}, request.arrays)
        try:
            self._ensure(lane)
            assert lane.channel is not None
            posted = Posted(lane, index, lane.generation)
            lane.posted.append(posted)
            wire.send_frame(lane.channel, frame)
        except (OSError, wire.ChannelError) as exc:
            posted = Posted(lane, index, lane.generation)
            posted.failure = self._lost(lane, index, exc)
        return posted

    def collect(self, posted: Posted) -> wire.Frame:
        """The reply to a :meth:`post`ed request (read-only arrays, received in place)."""
        lane = posted.lane
        if posted.failure is not None:
            return posted.failure
        if posted.generation != lane.generation:  # its process ended before it answered
            return self._failed(posted.index, "the simulated site's process ended")
        if not lane.posted or lane.posted[0] is not posted:
            raise RuntimeError("a site process's replies are collected in the order posted")
        lane.posted.popleft()
        assert lane.channel is not None
        try:
            return wire.recv_frame(lane.channel, immutable=True)
        except (OSError, wire.ChannelError) as exc:
            return self._lost(lane, posted.index, exc)

    def _lost(self, lane: _Lane, index: int, exc: Exception) -> wire.Frame:
        code = self._stop(lane)
        return self._failed(index, f"the simulated site's process ended ({exc}; exit code {code})")

    def _failed(self, index: int, why: str) -> wire.Frame:
        return wire.Frame(SiteReply.refusal(self._names[index], "", why, status="failed").header())

    def end_run(self, run_id: str) -> None:
        """Every process forgets the run's last updates and keys at the sites it served."""
        for lane in self._lanes:
            with lane.lock:
                if lane.process is None:
                    continue
                with contextlib.suppress(OSError, wire.ChannelError):
                    self._call(lane, wire.Frame({"op": END_RUN_OP, "run_id": run_id}))

    def close(self) -> None:
        """Stop every process (a request in progress is abandoned)."""
        for lane in self._lanes:
            self._stop(lane)

    def __enter__(self) -> SiteProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, lane: _Lane, frame: wire.Frame) -> wire.Frame:
        self._ensure(lane)
        assert lane.channel is not None
        wire.send_frame(lane.channel, frame)
        return wire.recv_frame(lane.channel)

    def _ensure(self, lane: _Lane) -> None:
        if lane.process is not None and lane.process.poll() is None:
            return
        self._stop(lane)
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child.fileno())],
                pass_fds=(child.fileno(),),
                stdin=subprocess.DEVNULL,
            )
        finally:
            child.close()
        lane.process, lane.channel = process, parent
        wire.send_frame(parent, wire.Frame({"op": SETUP_OP, **self._setup}))

    @staticmethod
    def _stop(lane: _Lane) -> int | None:
        if lane.process is not None or lane.posted:
            lane.generation += 1  # what it held is lost: collected as failures
            lane.posted.clear()
        if lane.channel is not None:
            lane.channel.close()  # the process's next read ends: it exits
        code = None
        if lane.process is not None:
            try:
                code = lane.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                lane.process.kill()
                code = lane.process.wait()
        lane.process, lane.channel = None, None
        return code


def _serve(channel: socket.socket) -> None:
    """A worker process: answer requests until the parent closes the channel."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    with channel:
        try:
            setup = wire.recv_frame(channel).header
        except (wire.ChannelError, OSError):
            return
        import torch

        from medfed.core.config import DataSourceConfig, validate
        from medfed.local.simulation import SitePool

        torch.set_num_threads(int(setup["threads"]))
        sites = [
            SimSite(s["name"], validate(DataSourceConfig, s["data"], where=s["name"]))
            for s in setup["sites"]
        ]
        pool = SitePool(
            Path(setup["root"]),
            sites,
            keep_warm=int(setup["keep_warm"]),
            budget=setup["budget"],
            policy=setup["policy"],
        )
        # Requests are read as they come and replies sent as the parent takes them, each
        # by a thread of its own: the process answers the next request meanwhile.
        inbox: queue.Queue[wire.Frame | None] = queue.Queue()
        outbox: queue.Queue[wire.Frame | None] = queue.Queue()
        reader = threading.Thread(target=_read, args=(channel, inbox), daemon=True)
        writer = threading.Thread(target=_write, args=(channel, outbox), daemon=True)
        reader.start()
        writer.start()
        try:
            while (request := inbox.get()) is not None:  # None: the parent closed the channel
                outbox.put(_answer(pool, request))
        finally:
            outbox.put(None)
            writer.join()


def _read(channel: socket.socket, inbox: queue.Queue[wire.Frame | None]) -> None:
    try:
        while True:
            inbox.put(wire.recv_frame(channel))
    except (wire.ChannelError, OSError):
        inbox.put(None)  # the parent closed the channel or is gone


def _write(channel: socket.socket, outbox: queue.Queue[wire.Frame | None]) -> None:
    while (reply := outbox.get()) is not None:
        try:
            wire.send_frame(channel, reply)
        except OSError:
            return


def _answer(pool: Any, request: wire.Frame) -> wire.Frame:
    if request.header.get("op") == END_RUN_OP:
        pool.end_run(str(request.header["run_id"]))
        return wire.Frame({"ok": True})
    header = dict(request.header)
    index = int(header.pop(SITE_KEY))
    try:
        return pool.worker(index).handle(wire.Frame(header, request.arrays))
    except Exception as exc:  # noqa: BLE001 - an error reply, as the site daemon's executor sends
        log.error("simulated site %s failed", pool.sites[index].name, exc_info=exc)
        why = f"{type(exc).__name__}: {exc}"
        return wire.Frame(
            SiteReply.refusal(pool.sites[index].name, "", why, status="failed").header()
        )


if __name__ == "__main__":
    exit_with_parent()  # a simulation's site process never outlives the simulation
    _serve(socket.socket(fileno=int(sys.argv[1])))
