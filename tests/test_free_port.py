"""Ports picked for later listeners stay out of the range outgoing connections use."""

from __future__ import annotations

import socket
from pathlib import Path

from medfed.core.procs import LISTEN_SPAN, ephemeral_range, free_port, port_in_use


def test_a_picked_port_lies_below_the_ephemeral_range_and_can_be_listened_on() -> None:
    ports = {free_port(ephemeral=(40_000, 60_999)) for _ in range(20)}
    assert all(40_000 - LISTEN_SPAN <= p < 40_000 for p in ports)
    assert len(ports) > 1  # drawn at random: parallel test workers rarely meet
    port = ports.pop()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))
        s.listen()
        assert port_in_use("127.0.0.1", port)


def test_the_machines_range_is_read_and_an_unknown_one_lets_the_os_pick(tmp_path: Path) -> None:
    source = tmp_path / "ip_local_port_range"
    source.write_text("32768\t60999\n")
    assert ephemeral_range(source) == (32768, 60999)
    source.write_text("garbage")
    assert ephemeral_range(source) is None
    assert ephemeral_range(tmp_path / "missing") is None
    # a range with no room below it: the OS's own pick, from the machine's range
    low, high = ephemeral_range() or (1, 65535)
    assert low <= free_port(ephemeral=(1024, 60999)) <= high
