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
        self.outstanding: dict[int, int] = {}  # lane -> site index whose reply is not collected

    def lane_of(self, index: int) -> int:
        return index % self.workers

    def post(self, index: int, request: wire.Frame) -> int:
        lane = self.lane_of(index)
        assert lane not in self.outstanding, "a process got a second request before its reply"
        self.outstanding[lane] = index
        self.log.append(("post", index))
        return index

    def collect(self, index: int) -> wire.Frame:
        del self.outstanding[self.lane_of(index)]
        self.log.append(("collect", index))
        reply = SiteReply.result(f"site-{index + 1}", {"num-examples": 1})
        return wire.Frame(reply.header(), {"w": np.full(4, index, np.float32)})


def test_the_server_takes_replies_in_push_order_and_holds_one_at_a_time(tmp_path: Path) -> None:
    sites = SitePool(tmp_path, synthetic_sites(6), keep_warm=0)
    log: list[tuple[str, int]] = []
    grid = SimulationGrid(sites, run_id=1, processes=_Processes(2, log))  # type: ignore[arg-type]
    order = [0, 2, 1, 4, 3, 5]  # site 2 waits for site 0's process, site 4 for site 2's
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
    # Both processes worked at once: site 1 (process 1) was posted before site 0's reply
    # was taken.
    assert log.index(("post", 1)) < log.index(("collect", 0))
    grid.close()
