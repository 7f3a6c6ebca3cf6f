"""Warm spare ServerApps: the hand-over, a gone spare, and the pool that keeps one."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medfed.core.heap import MODEL_BUFFER_ENV
from medfed.server.serverapp_spare import SOCKET_SUFFIX, SparePool, hand_over
from medfed.server.superexec_launcher import SERVERAPP_COMMAND, SpareFirst


def test_no_spare_means_no_hand_over(short_tmp: Path) -> None:
    assert not hand_over(str(short_tmp), ["--token", "t"])


def test_the_socket_of_a_spare_that_died_is_removed(short_tmp: Path) -> None:
    path = short_tmp / f"dead{SOCKET_SUFFIX}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(path))  # bound, never listening, then closed: as a killed spare leaves it
    assert path.exists()
    assert not hand_over(str(short_tmp), ["--token", "t"], timeout=1.0)
    assert not path.exists()


def test_without_a_spare_the_serverapp_starts_as_flower_starts_it(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[list[str]] = []
    envs: list[dict[str, str] | None] = []

    def popen(args: list[str], **kw: dict[str, str]) -> None:
        started.append(list(args))
        envs.append(kw.get("env"))

    monkeypatch.setattr(subprocess, "Popen", popen)
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    launcher = SpareFirst(str(short_tmp))
    launcher.Popen(["flower-something", "x"])  # not a ServerApp: started as is
    launcher.Popen([SERVERAPP_COMMAND, "--token", "t"], env={"PATH": "/bin"})  # started cold
    assert started == [["flower-something", "x"], [SERVERAPP_COMMAND, "--token", "t"]]
    assert launcher.handed_over == 0
    # the cold ServerApp keeps its model-size buffers as a spare would (medfed.core.heap)
    assert envs == [None, {"PATH": "/bin", **MODEL_BUFFER_ENV}]


def _wait_for(predicate, timeout: float = 60.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.slow
def test_a_spare_takes_a_run_and_the_pool_starts_the_next(short_tmp: Path) -> None:
    folder = short_tmp / "spares"
    pool = SparePool(folder, env={}, check_every=0.1).start()
    try:
        _wait_for(lambda: len(list(folder.glob("*" + SOCKET_SUFFIX))) == 1)
        first = pool._proc
        assert first is not None
        environ = Path(f"/proc/{first.pid}/environ").read_bytes().split(b"\0")
        assert all(f"{k}={v}".encode() in environ for k, v in MODEL_BUFFER_ENV.items())
        # flwr-serverapp's arguments; --help makes it print its usage and exit 0
        assert hand_over(str(folder), ["--help"])
        assert first is not None and first.wait(120) == 0
        _wait_for(lambda: pool.started == 2 and len(list(folder.glob("*" + SOCKET_SUFFIX))) == 1)
        second = pool._proc
    finally:
        pool.stop()
    assert second is not None and second.wait(10) is not None  # the idle spare ended
    assert list(folder.glob("*" + SOCKET_SUFFIX)) == []


def test_a_spare_that_dies_at_its_start_is_retried_with_a_back_off(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", "/bin/false")  # each spare exits 1 at once
    pool = SparePool(short_tmp / "spares", env={}, check_every=0.05)
    try:
        pool.start()
        time.sleep(1.5)
    finally:
        pool.stop()
    assert 1 <= pool.started <= 3  # 1 s, then 2 s apart: not one every 0.05 s


def test_a_spare_socket_appears_only_once_it_listens(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hand-over between bind and listen was refused, and took a live spare for gone."""
    import threading

    from medfed.server.serverapp_spare import _wait_for_run

    listen = socket.socket.listen

    def late_listen(self: socket.socket, *args: int) -> None:
        time.sleep(0.5)  # as a spare descheduled between bind and listen
        listen(self, *args)

    monkeypatch.setattr(socket.socket, "listen", late_listen)
    taken: list[list[str]] = []
    path = short_tmp / ("spare" + SOCKET_SUFFIX)
    waiter = threading.Thread(target=lambda: taken.append(_wait_for_run(str(path))), daemon=True)
    waiter.start()
    _wait_for(path.exists, timeout=10)
    assert hand_over(str(short_tmp), ["--help"], timeout=5)
    waiter.join(5)
    assert taken == [["--help"]]
