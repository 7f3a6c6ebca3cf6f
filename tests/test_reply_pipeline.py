"""The simulation's reply pipeline: the server holds one reply at a time, received in place.

Issue 21: a finished reply waits in its site's process until the server takes it,
and the ``.npy`` bytes it arrives as become the Flower ``Array``'s data as they are.
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from client.app import reply_message
from medfed.core import wire
from medfed.core.packing import npy_bytes
from medfed.core.schema import SiteReply
from medfed.local.sim_sites import synthetic_sites
from medfed.local.simulation import NODE_ID_BASE, SimulationGrid, SitePool
from medfed.local.site_processes import DEPTH


@pytest.fixture(autouse=True)
def _as_server_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are made as in a ServerApp process (Flower reads the task's identity)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


def _send_in_thread(sock: socket.socket, frame: wire.Frame) -> threading.Thread:
    sender = threading.Thread(target=wire.send_frame, args=(sock, frame))
    sender.start()
    return sender


def test_an_immutable_receive_keeps_the_npy_bytes_and_the_array_takes_them_uncopied() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    update = np.random.default_rng(0).standard_normal(3_000_000).astype(np.float32)  # 12 MB
    sender = _send_in_thread(
        a, wire.Frame(SiteReply.result("site-a", {"n": 1}).header(), {"w": update})
    )
    got = wire.recv_frame(b, immutable=True)
    sender.join()
    np.testing.assert_array_equal(got.arrays["w"], update)
    assert not got.arrays["w"].flags.writeable  # a view into the bytes as received
    assert got.npy["w"] == npy_bytes(update)
    msg = Message(RecordDict({"config": ConfigRecord({"server-round": 1})}), 1, "train")
    msg.metadata.__dict__["_message_id"] = "m-1"
    reply = reply_message(got, msg)
    assert reply.content["arrays"]["w"].data is got.npy["w"]  # no copy on the way in
    a.close(), b.close()


def test_a_writable_receive_gives_each_array_its_own_buffer() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sender = _send_in_thread(a, wire.Frame({"op": "train"}, {"w": np.arange(4, dtype=np.int64)}))
    got = wire.recv_frame(b)
    sender.join()
    got.arrays["w"][0] = 7  # a request's arrays may be changed by the site that gets them
    assert got.arrays["w"].tolist() == [7, 1, 2, 3] and got.npy == {}
    a.close(), b.close()


class _Processes:
    """Stands in for SiteProcesses: records when requests are posted and replies collected."""

    def __init__(self, workers: int, log: list[tuple[str, int]]) -> None:
        self.workers = workers
        self.log = log
        self.outstanding: dict[int, list[int]] = {}  # lane -> sites posted, not collected

    def lane_of(self, index: int) -> int:
        return index % self.workers

    def can_post(self, index: int) -> bool:
        return len(self.outstanding.get(self.lane_of(index), [])) < DEPTH

    def post(self, index: int, request: wire.Frame) -> int:
        held = self.outstanding.setdefault(self.lane_of(index), [])
        assert len(held) < DEPTH, "a process got more requests than it holds"
        held.append(index)
        self.log.append(("post", index))
        return index

    def collect(self, index: int) -> wire.Frame:
        held = self.outstanding[self.lane_of(index)]
        assert held[0] == index, "a process's replies are collected in the order posted"
        held.pop(0)
        self.log.append(("collect", index))
        reply = SiteReply.result(f"site-{index + 1}", {"num-examples": 1})
        return wire.Frame(reply.header(), {"w": np.full(4, index, np.float32)})


def test_the_server_takes_replies_in_push_order_and_holds_one_at_a_time(tmp_path: Path) -> None:
    sites = SitePool(tmp_path, synthetic_sites(10), keep_warm=0)
    log: list[tuple[str, int]] = []
    grid = SimulationGrid(sites, run_id=1, processes=_Processes(2, log))  # type: ignore[arg-type]
    order = [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]  # five sites of process 0, then five of process 1
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": Array(np.zeros(4, np.float32))}),
            "config": ConfigRecord({"server-round": 1}),
        }
    )
    ids = grid.push_messages([Message(content, NODE_ID_BASE + i, "train") for i in order])
    taken: list[int] = []
    for reply in grid.pull_messages(ids):
        taken.append(int(reply.content["arrays"]["w"].numpy()[0]))
        # Only the reply taken has left its process: none is collected and waiting.
        assert [i for kind, i in log if kind == "collect"] == taken
        del reply
    assert taken == order
    for lane in (0, 1):  # each process got its sites' messages in push order, one at a time
        assert [i for kind, i in log if kind == "post" and i % 2 == lane] == [
            i for i in order if i % 2 == lane
        ]
    # Both processes worked at once, each on up to DEPTH messages: process 1 had its
    # first sites before site 0's reply was taken, process 0 never more than DEPTH.
    first_collect = log.index(("collect", 0))
    assert [e for e in log[:first_collect] if e[0] == "post"] == [
        ("post", i) for i in (0, 2, 4, 1, 3, 5)
    ]
    grid.close()
