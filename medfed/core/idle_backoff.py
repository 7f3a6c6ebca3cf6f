"""Poll fast while a federation is busy, slowly when it has been idle for a while.

A site polls the SuperLink (and its executor polls the SuperNode) every ``base``
seconds for ``hot_s`` seconds after its last message, so rounds keep their latency;
after that the interval doubles every ``hot_s`` seconds of quiet, up to ``cap``
(Flower's own 3 s). An idle federation of many sites then costs the SuperLink
little, instead of ``sites / base`` signed HTTPS requests a second for weeks.
"""

from __future__ import annotations

import threading
import time


class IdleBackoff:
    """The next poll interval, from the time since the last activity."""

    def __init__(self, base: float, cap: float = 3.0, hot_s: float = 15.0) -> None:
        if not 0 < base <= cap or hot_s <= 0:
            raise ValueError(f"need 0 < base <= cap and hot_s > 0, got {base}, {cap}, {hot_s}")
        self.base, self.cap, self.hot_s = base, cap, hot_s
        self._last = time.monotonic()
        self._lock = threading.Lock()

    def active(self) -> None:
        """A message came or went: poll fast again."""
        with self._lock:
            self._last = time.monotonic()

    def interval(self, now: float | None = None) -> float:
        """Seconds to wait before the next poll."""
        with self._lock:
            idle = (time.monotonic() if now is None else now) - self._last
        if idle <= self.hot_s:
            return self.base
        return min(self.cap, self.base * 2.0 ** ((idle - self.hot_s) / self.hot_s))
