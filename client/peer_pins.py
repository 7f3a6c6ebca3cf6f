"""Trust on first use for peer identity keys, like SSH's known_hosts.

The server relays the identity directory {site: Ed25519 public key}; on its own
that is only as trustworthy as the server. The site pins each peer's key the first
time it sees it, and refuses any later run in which that peer's key changed.
"""

from __future__ import annotations

import datetime as dt
import difflib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from medfed.core.errors import MedfedError
from medfed.core.files import atomic_write
from medfed.core.secagg import RosterError, fingerprint

PINS_FILE = "keys/secagg-peers.json"


@dataclass(frozen=True)
class Pin:
    """One pinned peer: its identity key and when it was first seen."""

    site: str
    key: bytes
    first_seen: str
    run_id: str

    @property
    def fingerprint(self) -> str:
        """Short SHA-256 of the key (what operators compare out of band)."""
        return fingerprint(self.key)


class PeerPins:
    """The site's pinned peer identity keys (one JSON file, owner-only)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def load(self) -> dict[str, Pin]:
        """All pins, by site name (none before the first run)."""
        if not self.path.exists():
            return {}
        try:
            peers = json.loads(self.path.read_text(encoding="utf-8"))["peers"]
            return {
                s: Pin(s, bytes.fromhex(p["key"]), str(p["first_seen"]), str(p["run"]))
                for s, p in peers.items()
            }
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MedfedError(
                f"The pinned peer keys file is unreadable: {exc}.",
                where=str(self.path),
                expected='{"peers": {site: {"key", "first_seen", "run"}}}',
                fix="restore it from a backup; deleting it re-pins every peer "
                "on the next run (trust on first use again)",
            ) from None

    def check(self, directory: Mapping[str, bytes], *, own: str) -> list[str]:
        """Names in ``directory`` not pinned yet; raises if a pinned peer's key changed."""
        pins = self.load()
        for site, key in sorted(directory.items()):
            pin = pins.get(site)
            if site == own or pin is None or pin.key == key:
                continue
            raise RosterError(
                f"The identity key relayed for peer site {site!r} is not the one this site "
                f"pinned on {pin.first_seen} (run {pin.run_id}): pinned {pin.fingerprint}, "
                f"relayed {fingerprint(key)}. The round is refused.",
                where=f"{self.path} (peer {site!r})",
                expected="the pinned key (trust on first use, like SSH known_hosts)",
                fix=f"if {site!r} really re-keyed (confirm the new fingerprint with its "
                f"operator out of band), run `medfed site peers --config site.toml --forget "
                f"{site}`; otherwise stop the run: the relay may be substituting keys",
            )
        return sorted(s for s in directory if s != own and s not in pins)

    def add(self, directory: Mapping[str, bytes], names: list[str], *, run_id: str) -> None:
        """Pin ``names`` with their keys from ``directory`` (first seen now, in ``run_id``)."""
        if not names:
            return
        pins = self.load()
        today = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
        for site in names:
            pins[site] = Pin(site, directory[site], today, run_id)
        self._write(pins)

    def forget(self, site: str) -> Pin:
        """Remove one pin (the peer re-keyed); the next run pins its new key."""
        pins = self.load()
        if site not in pins:
            close = difflib.get_close_matches(site, list(pins), n=1)
            raise MedfedError(
                f"No pinned peer named {site!r}.",
                where=str(self.path),
                expected=f"one of {sorted(pins)}" if pins else "a pinned peer",
                fix=f"did you mean {close[0]!r}?"
                if close
                else "list them with `medfed site peers --config site.toml`",
            )
        pin = pins.pop(site)
        self._write(pins)
        return pin

    def _write(self, pins: Mapping[str, Pin]) -> None:
        body = {
            "peers": {
                s: {"key": p.key.hex(), "first_seen": p.first_seen, "run": p.run_id}
                for s, p in sorted(pins.items())
            }
        }
        # atomic_write's temporary file is created 0600 (mkstemp) and renamed: owner-only
        atomic_write(self.path, (json.dumps(body, indent=2) + "\n").encode())
