"""Make a child process end when the process that started it is gone.

medfed's daemons start Flower processes in their own sessions (so a stop reaches
everything they spawn). If a daemon is killed outright, this watcher in the child
notices the new parent and ends the child's whole process group.
"""

from __future__ import annotations

import os
import signal
import threading
import time

# Set by a process that starts medfed daemons it must not leave behind (demo, tests).
EXIT_WITH_PARENT_ENV = "MEDFED_EXIT_WITH_PARENT"


def watch_parent(interval: float = 0.5) -> threading.Thread:
    """Start a daemon thread that SIGTERMs this process group once the parent changes."""
    parent = os.getppid()

    def _watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent:
                os.killpg(os.getpgid(0), signal.SIGTERM)
                return

    thread = threading.Thread(target=_watch, name="medfed-parent-watch", daemon=True)
    thread.start()
    return thread
