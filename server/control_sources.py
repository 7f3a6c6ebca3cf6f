"""From where the Control API may be called (server.toml ``[superlink] control_from``).

Flower 1.42 serves the Control API on the port the sites dial, so it cannot be bound
to an address of its own; the gate refuses Control API calls from any other source
before their signature is even read. ``"this-host"`` (the default) admits the server
host's own addresses (loopback, or its LAN address when a coordinator on the host
dials the public name); networks (``"10.20.0.0/16"``) admit coordinators elsewhere;
``"any"`` admits every source (the signature still decides).
"""

from __future__ import annotations

import functools
import ipaddress
import socket

THIS_HOST = "this-host"
ANY = "any"


@functools.lru_cache(maxsize=256)
def is_this_host(address: str) -> bool:
    """Whether ``address`` belongs to this machine (it can bind a socket to it)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((address, 0))  # only this host's own addresses bind; nothing is sent
    except OSError:
        return False
    return True


class SourceFilter:
    """Admits Control API calls from the configured sources only."""

    def __init__(self, items: list[str]) -> None:
        self.items = list(items)  # checked where server.toml is read (core/config.py)
        self.networks = [
            ipaddress.ip_network(i, strict=False) for i in self.items if i not in (THIS_HOST, ANY)
        ]

    def refusal(self, address: str) -> str:
        """Why a call from ``address`` is refused ("" if it is admitted)."""
        if ANY in self.items:
            return ""
        if THIS_HOST in self.items and is_this_host(address):
            return ""
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is not None and any(ip in n for n in self.networks):
            return ""
        return (
            f"the Control API accepts calls only from {', '.join(self.items)} (server.toml "
            f"[superlink] control_from); this one came from {address or 'an unknown peer'}"
        )
