"""Single-vector weights and the local channel's frames."""

from __future__ import annotations

import socket
import struct

import numpy as np
import pytest

from medfed.core import wire
from medfed.core.packing import Layout, pack, unpack


def test_pack_unpack_round_trip() -> None:
    rng = np.random.default_rng(0)
    state = {
        "a": rng.normal(size=(3, 4)).astype(np.float32),
        "b": np.arange(5, dtype=np.int64),
        "c": rng.normal(size=(2, 1, 2)).astype(np.float32),
    }
    layout = Layout.of(state)
    vec = pack(state)
    assert vec.shape == (layout.size,) and vec.dtype == np.float32
    back = unpack(vec, layout)
    for k in state:
        np.testing.assert_array_equal(back[k], state[k])
        assert back[k].dtype == state[k].dtype


def test_unpack_rejects_wrong_size() -> None:
    layout = Layout.of({"a": np.zeros((2, 2), np.float32)})
    with pytest.raises(ValueError, match="model differs"):
        unpack(np.zeros(5, np.float32), layout)


def test_frame_round_trip() -> None:
    a, b = socket.socketpair()
    frame = wire.Frame(
        {"op": "train", "config": {"x": 1}}, {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    )
    wire.send_frame(a, frame)
    got = wire.recv_frame(b)
    assert got.header == frame.header
    np.testing.assert_array_equal(got.arrays["w"], frame.arrays["w"])
    a.close(), b.close()


def test_malformed_frames_are_rejected() -> None:
    a, b = socket.socketpair()
    a.sendall(struct.pack(">Q", 5) + b"{bad}")
    with pytest.raises(wire.ChannelError, match="not JSON"):
        wire.recv_frame(b)
    a2, b2 = socket.socketpair()
    header = b'{"header": {}, "arrays": [{"name": "w", "dtype": "<f4", "shape": [4]}]}'
    a2.sendall(
        struct.pack(">Q", len(header))
        + header
        + struct.pack(">Q", 1)
        + struct.pack(">Q", 3)
        + b"abc"
    )
    with pytest.raises(wire.ChannelError, match="shape needs"):
        wire.recv_frame(b2)
    a3, b3 = socket.socketpair()
    a3.close()
    with pytest.raises(wire.ChannelError, match="closed"):
        wire.recv_frame(b3)
    for s in (a, b, a2, b2, b3):
        s.close()


def test_unreachable_worker_says_what_to_start(tmp_path) -> None:
    with pytest.raises(wire.ChannelError, match="medfed site start"):
        wire.call_worker(str(tmp_path / "none.sock"), wire.Frame({"op": "ping"}))
